"""``cost-fast bench``: a small selection end to end, bad arguments, and no half-written output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_fast.apps import report
from cost_fast.apps.cli import main
from cost_fast.apps.report import MARKER
from cost_fast.bench import runner

PNG = b"\x89PNG\r\n\x1a\n"
SELECTION = "fairgrad_solve and 3-2.0"  # two solver benchmarks, about a second


def test_bench_writes_json_plot_and_summary_and_keeps_other_files(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "gram_cuda.json").write_text("{}")  # an earlier run on another device
    tag = runner.device_tag()
    # an earlier result of another suite on this device: kept, and summarized with the new one
    earlier = Path(__file__).parents[1] / "bench" / "results" / "teleport_cpu.json"
    (out / f"teleport_{tag}.json").write_text(earlier.read_text())
    report._write_marker(out, "id earlier", ["gram_cuda.json", f"teleport_{tag}.json"])  # an earlier bench output
    assert main(["bench", "--out", str(out), "--suites", "solvers,gram", "-k", SELECTION]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            MARKER,
            "gram_cuda.json",
            f"teleport_{tag}.json",
            f"solvers_{tag}.json",
            f"solvers_{tag}.png",
            f"summary_{tag}.md",
        ]
    )
    assert (out / "gram_cuda.json").read_text() == "{}"
    data = json.loads((out / f"solvers_{tag}.json").read_text())
    assert data["stamp"]["torch"] and data["stamp"]["device_type"] == tag
    impls = sorted(b["extra_info"]["impl"] for b in data["benchmarks"])
    assert impls == ["ours", "reference"] and all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    assert (out / f"solvers_{tag}.png").read_bytes()[:8] == PNG
    summary = (out / f"summary_{tag}.md").read_text()
    assert "speed-up vs reference" in summary and "fairgrad alpha=2.0 K=3" in summary
    assert summary.index("### solvers") < summary.index("### teleport")  # suites in their usual order
    printed = capsys.readouterr().out
    assert "selects nothing in suite gram" in printed and f"wrote 3 files to {out}" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging, no .benchmarks/


def test_a_folder_of_the_users_is_never_written_into(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "solvers_cpu.json").write_text("my own file")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(out), "--suites", "solvers", "-k", SELECTION])
    assert exc.value.code == 2 and "never overwritten" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["solvers_cpu.json"] and (
        out / "solvers_cpu.json"
    ).read_text() == "my own file"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suites", "gram,nope"], "suites must be"),
        (["--suites", "gram,gram"], "suites must be"),
        (["--suites", "solvers", "-k", "K=3"], "rejected the selection"),
        (["--suites", "solvers", "-k", "no_such_benchmark"], "selects no benchmark"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(out), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_folder_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--out", str(tmp_path / "missing" / "results"), "--suites", "solvers"])
    assert exc.value.code == 2 and "cannot write the report folder" in capsys.readouterr().err


def test_a_failing_suite_leaves_the_output_folder_as_it_was(tmp_path: Path, monkeypatch, capsys) -> None:
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "test_bench_gram.py").write_text(
        "def test_speed(benchmark):\n    benchmark.extra_info['impl'] = 'ours'\n    benchmark(lambda: None)\n"
    )
    (suites / "test_bench_grads.py").write_text("def test_speed(benchmark):\n    assert False, 'broken'\n")
    monkeypatch.setattr(runner, "HERE", suites)
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    report._write_marker(out, "id earlier", ["keep.txt"])  # an earlier bench output
    assert main(["bench", "--out", str(out), "--suites", "gram,grads"]) == 1
    assert "benchmark suite grads failed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "keep.txt"])  # gram's result not moved in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
