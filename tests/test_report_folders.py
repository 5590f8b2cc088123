"""Nothing lost: report folders replace only our own, every path error comes before any work, a
race with another run and a SIGTERM leave nothing half done; and a fuzz of the command line
(random subcommands, options and output paths among existing files, folders with content, links
and the current folder): every run exits 0 or 2 without a traceback, and every file that existed
before is byte-for-byte intact."""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from cost_fast.apps.cli import main
from cost_fast.apps.report import MARKER, atomic_report_dir, check_report_target


def make_sandbox(root: Path) -> None:
    (root / "thesis.tex").write_text("\\documentclass{article} my thesis\n")
    (root / "mydata" / "sub").mkdir(parents=True)
    (root / "mydata" / "notes.txt").write_text("notes\n")
    (root / "mydata" / "sub" / "x.bin").write_bytes(bytes(range(256)))
    (root / "empty").mkdir()
    (root / "link").symlink_to(root / "mydata", target_is_directory=True)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under root (links not followed) and its bytes."""
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def test_existing_folders_and_files_are_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    make_sandbox(tmp_path)
    monkeypatch.chdir(tmp_path)
    for bad, reason in [
        ("mydata", "did not write"),
        ("thesis.tex", "not a folder"),
        ("link", "symbolic link"),
        (".", "current folder"),
        ("", "empty"),
        ("..", "current folder or one above"),
        ("missing/report", "not a folder"),
    ]:
        with pytest.raises(ValueError, match=reason):
            check_report_target(bad)
    assert check_report_target("empty") == Path("empty")
    assert check_report_target("new") == Path("new")


@pytest.mark.skipif(os.geteuid() != 0 and not Path("/proc").exists(), reason="needs /proc")
def test_an_unwritable_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not writable|not a folder"):
        check_report_target("/proc/x")


def test_a_previous_report_is_replaced_only_when_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with atomic_report_dir(target) as folder:
        (folder / "a.txt").write_text("first")
    assert (target / MARKER).is_file() and (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_report_dir(target) as folder:
        (folder / "a.txt").write_text("half")
        raise RuntimeError("the run failed")
    assert (target / "a.txt").read_text() == "first"  # untouched by the failed run
    with atomic_report_dir(target) as folder:
        (folder / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER, "b.txt"])
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left


def test_a_folder_created_meanwhile_by_someone_else_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with pytest.raises(ValueError, match="changed by someone else") as err:
        with atomic_report_dir(target) as folder:
            (folder / "ours.txt").write_text("ours")
            target.mkdir()  # e.g. another tool, between our check and our rename
            (target / "theirs.txt").write_text("theirs")
    assert (target / "theirs.txt").read_text() == "theirs" and not (target / "ours.txt").exists()
    kept = tmp_path / "report-1"
    assert str(kept) in str(err.value) and (kept / "ours.txt").read_text() == "ours"


def signalled_reproduction(tmp_path: Path, signum: int) -> tuple[int, str, str]:
    """(exit status, stderr, what else to show on failure) of ``cost-fast reproduce --quick``
    sent ``signum`` once it writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cost_fast.apps.cli", "reproduce", "--quick", "--out", str(tmp_path / "rep")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job (`pytest &`) ignores SIGINT, and so would the run it starts.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    staging = f".rep.{proc.pid}."  # its staging folder (not the writability check's ".rep.check.")
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(staging) for p in tmp_path.iterdir()):
        time.sleep(0.05)  # wait until the run has started writing
    assert any(p.name.startswith(staging) for p in tmp_path.iterdir()), "the run never started"
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    listing = sorted(p.name for p in tmp_path.iterdir())
    return proc.returncode, err, f"stderr {err!r}, stdout {out[-300:]!r}, folder {listing}"


def test_sigterm_removes_the_staging_folder(tmp_path: Path) -> None:
    returncode, err, detail = signalled_reproduction(tmp_path, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, detail
    assert "Traceback" not in err and err.strip().splitlines() == [
        "cost-fast reproduce: terminated (signal 15); no report was written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_sigint_ends_the_run_with_one_line_and_nothing_left_behind(tmp_path: Path) -> None:
    returncode, err, detail = signalled_reproduction(tmp_path, signal.SIGINT)
    assert returncode == 128 + signal.SIGINT, detail
    assert err.strip().splitlines() == ["cost-fast reproduce: interrupted; no report was written"], err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    from cost_fast.apps import report

    def full_disk(staging: Path, path: Path, *_) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "_move_into_place", full_disk)
    code, err = run_cli(["toy", "--steps", "5", "--out", str(tmp_path / "toy")])
    assert code == 1 and err.strip().splitlines() == [
        f"cost-fast toy: error: No space left on device ({tmp_path / 'toy'}); no report was written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_disk_without_room_a_mount_point_and_an_absurd_seed_are_refused_up_front(tmp_path: Path, monkeypatch) -> None:
    from cost_fast.apps import report

    real = report.shutil.disk_usage
    monkeypatch.setattr(report.shutil, "disk_usage", lambda path: real(path)._replace(free=2**20))
    code, err = run_cli(["toy", "--steps", "5", "--out", str(tmp_path / "toy")])
    assert code == 2 and "1.0 MB free on its disk" in err and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    if os.path.ismount("/proc"):
        with pytest.raises(ValueError, match="mount point"):
            check_report_target("/proc")
    for seed in (str(2**70), "-1", "x"):
        code, err = run_cli(["toy", "--steps", "5", "--seed", seed, "--out", str(tmp_path / "toy")])
        assert code == 2 and "--seed" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_sigterm_that_python_wraps_in_another_exception_still_exits_143(monkeypatch, tmp_path: Path, capsys) -> None:
    # A SIGTERM that lands while a class body is created (e.g. during matplotlib's import)
    # reaches the command as a RuntimeError from the handler's exception (seen in CI).
    import cost_fast.apps.cli as cli
    from cost_fast.apps import signals

    def terminated_inside_an_import(*args, **kwargs):
        try:
            signals._handler(signal.SIGTERM, None)
        except signals.Interrupted as stopped:
            raise RuntimeError("Error calling __set_name__ on 'x' instance 'locs' in 'Formatter'") from stopped

    monkeypatch.setattr("cost_fast.apps.reproduce.run_reproduction", terminated_inside_an_import)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(["reproduce", "--quick", "--out", str(tmp_path / "rep")]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines() == [
        "cost-fast reproduce: terminated (signal 15); no report was written"
    ]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous  # the caller's, back
    # an error that is not a termination is not disguised as one
    monkeypatch.setattr("cost_fast.apps.reproduce.run_reproduction", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["reproduce", "--quick", "--out", str(tmp_path / "rep")])


def handlers_installed(pid: int) -> bool:
    """The process catches SIGTERM (Linux: /proc/PID/status SigCgt), i.e. cost-fast's handlers are
    in place (Python catches SIGINT from its start, SIGTERM only once ``main`` has run)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", [["toy", "--steps", "400"], ["demo", "--epochs", "3", "--no-progress"]])
def test_a_signal_anywhere_ends_the_command_with_its_one_line(tmp_path: Path, command, signum) -> None:
    """Whether it lands in an import (torch's, matplotlib's, sklearn's), in training or while
    the report is written: one line, 128 + the signal, nothing left behind. The moments are
    counted from when the handlers are in place, so no load of the machine moves them out of
    the run."""
    what = "interrupted" if signum == signal.SIGINT else f"terminated (signal {signum})"
    for delay in (0.0, 0.2, 0.5, 1.0, 2.0):
        out = tmp_path / f"run{delay}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cost_fast.apps.cli", *command, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 60
        while not handlers_installed(proc.pid) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # the run finished before the signal: its report is whole
            assert (out / ".cost_fast_report").is_file()
            continue
        assert proc.returncode == 128 + signum and err.splitlines() == [
            f"cost-fast {command[0]}: {what}; no report was written"
        ], f"{command} at +{delay}s: {proc.returncode} {err!r}"
        assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in tmp_path.iterdir())


def test_an_interrupted_bench_leaves_no_suite_running(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cost_fast.apps.cli", "bench", "--suites", "solvers", "--out", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    children: list[int] = []
    while not children and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert children, "the suite never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and err.splitlines() == [
        "cost-fast bench: interrupted; no report was written"
    ], err
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()


def test_an_out_path_too_long_for_the_file_system_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["toy", "--steps", "5", "--out", str(tmp_path / ("a" * 4096))])
    assert code == 2 and err.splitlines()[-1].startswith("cost-fast: error: cannot use") and "too long" in err
    assert len(err.splitlines()[-1]) < 200 and list(tmp_path.iterdir()) == []


# -- folders beside the target that are not a run's staging folders ----------------------------


def test_a_users_folder_named_like_a_staging_folder_is_never_touched(tmp_path: Path) -> None:
    backup = tmp_path / ".r.2024.backup"  # the name of a staging folder of a process 2024, long gone
    backup.mkdir()
    (backup / "thesis.tex").write_text("mine")
    (tmp_path / "r").write_text("a file where the report would go")
    code, err = run_cli(["toy", "--steps", "5", "--out", str(tmp_path / "r")])
    assert code == 2 and "not a folder" in err
    assert (backup / "thesis.tex").read_text() == "mine"
    (tmp_path / "r").unlink()
    assert run_cli(["toy", "--steps", "5", "--out", str(tmp_path / "r")])[0] == 0
    assert (backup / "thesis.tex").read_text() == "mine"


def test_a_link_planted_as_an_old_report_folder_is_never_followed(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "report" / "notes.md").write_text("mine")
    from cost_fast.apps import report

    report._write_marker(project / "report", "id planted", ["notes.md"])  # looks like a report of ours
    work = tmp_path / "work"
    work.mkdir()
    (work / f".r.old.{dead_pid()}.y").symlink_to(project)
    (work / f".r.{dead_pid()}.z").symlink_to(project)
    assert run_cli(["toy", "--steps", "5", "--out", str(work / "r")])[0] == 0
    assert (project / "report" / "notes.md").read_text() == "mine"


def test_a_staging_folder_of_a_run_in_another_container_is_left_alone(tmp_path: Path) -> None:
    from cost_fast.apps import staging

    theirs = staging.make_staging(tmp_path, f".r.{dead_pid()}.", dead_pid())
    marker = theirs / staging.STAGING_MARKER
    lines = marker.read_text().splitlines()
    lines[3] = "another-host pid:[4026531836]"  # its process id means another process there
    marker.write_text("\n".join(lines) + "\n")
    (theirs / "half.json").write_text("their run, still working")
    assert run_cli(["toy", "--steps", "5", "--out", str(tmp_path / "r")])[0] == 0
    assert (theirs / "half.json").read_text() == "their run, still working"


def test_a_planted_manifest_never_deletes_outside_the_report_or_through_a_link(tmp_path: Path) -> None:
    from cost_fast.apps import report

    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    users = tmp_path / "users"
    users.mkdir()
    (users / "f").write_text("mine too")
    target = tmp_path / "r"
    target.mkdir()
    (target / "sub").symlink_to(users)
    report._write_marker(target, "id planted", [str(outside), "../precious.txt", "sub/f", "sub"])
    code, err = run_cli(["toy", "--steps", "5", "--out", str(target)])
    assert code in (0, 2), err
    assert outside.read_text() == "mine" and (users / "f").read_text() == "mine too"


def test_a_marker_of_another_format_makes_no_folder_ours(tmp_path: Path) -> None:
    target = tmp_path / "r"
    target.mkdir()
    (target / ".cost_fast_report").write_text("written by an earlier cost-fast\n")  # no manifest
    (target / "my_notes.md").write_text("mine")
    code, err = run_cli(["toy", "--steps", "5", "--out", str(target)])
    assert code == 2 and "did not write" in err
    assert (target / "my_notes.md").read_text() == "mine"


PATHS = [
    "thesis.tex",
    "mydata",
    "mydata/sub",
    "empty",
    "link",
    ".",
    "",
    "..",
    "new_report",
    "new report with spaces",
    "nested/new/report",
    "thesis.tex/inside",
    "mydata/../mydata",
    "/proc/x",
]
OPTIONS = {
    "demo": [
        ["--epochs", "1"],
        ["--epochs", "0"],
        ["--epochs", "x"],
        ["--method", "mgda"],
        ["--method", "nope"],
        ["--method", "moco"],
        ["--semantics", "paper"],
        ["--semantics", "reference"],
        ["--device", "meta"],
        ["--device", "bogus"],
        ["--batch-size", "0"],
        ["--batch-size", "512"],
        ["--hidden", "4"],
        ["--gradients", "representation"],
        ["--gradients", "both"],
        ["--teleport", "rescale"],
        ["--no-progress"],
    ],
    "toy": [["--steps", "5"], ["--steps", "0"], ["--steps-per-epoch", "5"], ["--semantics", "paper"]],
    "profile": [
        ["--tasks", "2", "--width", "1", "--batch-size", "2", "--rows", "2"],
        ["--batch-size", "1"],
        ["--device", "meta"],
        ["--tasks", "0"],
    ],
    "reproduce": [["--quick"], ["--quick", "--bogus"]],
    "bench": [["--suites", "nope"], ["--suites", "gram,gram"], ["-k", "and"]],
}
# the expensive parts of a run that is valid, kept small so that the fuzz stays quick
SMALL = {
    "demo": ["--epochs", "1", "--no-progress"],
    "toy": ["--steps", "5"],
    "profile": ["--tasks", "2", "--width", "1"],
    "bench": ["--suites", "gram", "-k", "no_such_benchmark"],
}


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
        except BaseException:  # a traceback: what a user must never see
            return -1, traceback.format_exc()
    return code, err.getvalue()


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_the_command_line(seed: int, tmp_path: Path, monkeypatch) -> None:
    make_sandbox(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    rng = random.Random(seed)
    for _ in range(10):
        command = rng.choice(sorted(OPTIONS))
        argv = [command, *SMALL.get(command, [])]
        for option in rng.sample(OPTIONS[command], k=rng.randint(0, 2)):
            argv += option
        if command != "reproduce" or rng.random() < 0.3:  # a valid reproduce takes seconds
            argv += ["--out", rng.choice(PATHS)]
        elif "--out" not in argv:
            argv += ["--out", rng.choice(PATHS[:8])]  # existing things: refused at once
        code, err = run_cli(argv)
        assert code in (0, 2), f"{argv}: exit {code}\n{err}"
        assert "Traceback" not in err, f"{argv}:\n{err}"
        now = snapshot(tmp_path)
        for name, data in before.items():
            assert now.get(name) == data, f"{argv} changed or removed {name}"
        assert not (tmp_path / ".benchmarks").exists()


def test_the_communication_benchmark_never_writes_into_a_users_folder(tmp_path: Path, capsys) -> None:
    from cost_fast.bench.distributed_comm import main as comm_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "distributed_cpu.json").write_text("my own file")
    with pytest.raises(SystemExit) as exit_info:
        comm_main([str(mine)])
    assert exit_info.value.code == 2 and "never overwritten" in capsys.readouterr().err
    assert (mine / "distributed_cpu.json").read_text() == "my own file"


def dead_pid() -> int:
    """The id of a process that has exited (a killed run's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_file_put_beside_an_earlier_report_is_never_deleted(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with atomic_report_dir(target) as folder:
        (folder / "a.txt").write_text("first")
    (target / "my_notes.txt").write_text("mine")
    code, err = run_cli(["toy", "--steps", "5", "--out", str(target)])
    assert code == 2 and "my_notes.txt" in err and "Traceback" not in err
    assert (target / "my_notes.txt").read_text() == "mine" and (target / "a.txt").read_text() == "first"
    # a file that appears while a run works is found again at the swap: the run keeps its report apart
    (target / "my_notes.txt").unlink()
    with pytest.raises(ValueError, match="this run's report is in") as kept:
        with atomic_report_dir(target) as folder:
            (folder / "b.txt").write_text("second")
            (target / "late.txt").write_text("mine too")
    assert (target / "late.txt").read_text() == "mine too" and (target / "a.txt").read_text() == "first"
    assert (tmp_path / "report-1" / "b.txt").read_text() == "second" and "report-1" in str(kept.value)


def test_of_two_runs_to_one_folder_the_second_to_finish_keeps_its_report_apart(tmp_path: Path) -> None:
    from cost_fast.apps import report

    target = tmp_path / "report"
    report.begin_run()
    check_report_target(target)  # both runs start while the folder does not exist
    with atomic_report_dir(target) as folder:  # the first run finishes
        (folder / "a.txt").write_text("first run")
    report._SEEN_AT_START[target.resolve()] = None  # the second run's start saw no folder either
    with pytest.raises(ValueError, match="this run's report is in") as second:
        with atomic_report_dir(target) as folder:
            (folder / "a.txt").write_text("second run")
    assert (target / "a.txt").read_text() == "first run"
    assert (tmp_path / "report-1" / "a.txt").read_text() == "second run" and "report-1" in str(second.value)


@pytest.mark.parametrize("new_was_complete", [True, False])
def test_a_swap_cut_by_a_kill_is_finished_or_undone_by_the_next_run(tmp_path: Path, new_was_complete: bool) -> None:
    from cost_fast.apps import report, staging

    target = tmp_path / "report"
    with atomic_report_dir(target) as folder:
        (folder / "a.txt").write_text("old report")
    pid = dead_pid()  # the killed run: its old report moved out of the way, the new one not yet in
    old = staging.make_staging(tmp_path, f".report.old.{pid}.", pid)
    os.rename(target, old / "report")
    new = staging.make_staging(tmp_path, f".report.{pid}.", pid)
    (new / "b.txt").write_text("new report")
    if new_was_complete:
        report._write_marker(new, "id killed", ["b.txt"])
    other = dead_pid()  # another killed run's staging folder
    leftover = staging.make_staging(tmp_path, f".report.{other}.", other)
    (leftover / "half.txt").write_text("half")
    (tmp_path / "theirs.txt").write_text("not ours")
    check_report_target(target)
    expected = {"b.txt": "new report"} if new_was_complete else {"a.txt": "old report"}
    assert {p.name: p.read_text() for p in target.iterdir() if p.name != MARKER} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "theirs.txt"]


def test_a_folder_made_by_someone_else_during_a_bench_run_is_left_alone(tmp_path: Path, monkeypatch) -> None:
    from cost_fast.bench import runner

    out = tmp_path / "results"
    real = runner._run_streaming

    def meanwhile(command, stream, cwd):  # the user makes the folder and a file while the suite runs
        out.mkdir(exist_ok=True)
        (out / "summary_cpu.md").write_text("mine")
        return real(command, stream, cwd)

    monkeypatch.setattr(runner, "_run_streaming", meanwhile)
    code, err = run_cli(["bench", "--out", str(out), "--suites", "solvers", "-k", "fairgrad_solve and 3-2.0"])
    assert code == 2 and "this run's report is in" in err and "Traceback" not in err
    assert (out / "summary_cpu.md").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "summary_cpu.md"
    ]
    assert (tmp_path / "results-1" / "solvers_cpu.json").is_file()


def test_a_signal_whose_exception_was_dropped_still_ends_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """A SIGTERM landing in a finalizer is only printed by Python, its exception dropped (seen:
    a reproduce run went on and wrote its report): the note it left ends the run at the next
    step all the same."""
    import cost_fast.apps.cli as cli
    from cost_fast.apps import signals
    from cost_fast.cost import COST

    monkeypatch.setattr(signals, "_RECEIVED", [])  # the note is this test's alone
    real_step = COST.step
    calls = []

    def step_whose_signal_is_dropped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signals._RECEIVED.append(signal.SIGTERM)  # as the handler notes it, its exception lost
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(COST, "step", step_whose_signal_is_dropped)
    code = cli.main(["toy", "--steps", "50", "--out", str(tmp_path / "toy")])
    assert code == 128 + signal.SIGTERM and len(calls) == 3
    assert capsys.readouterr().err.splitlines() == ["cost-fast toy: terminated (signal 15); no report was written"]
    assert list(tmp_path.iterdir()) == []
