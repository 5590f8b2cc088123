"""``cost-fast train`` on tiny data sets in the real layouts: two epochs with COST teleporting,
the files of the run, the reported metrics and Δm% recomputed from them, resume in a fresh
process equal to the uninterrupted run, and the refusals (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experiment_fixtures import write_celeba, write_dense

from cost_fast import checkpoint
from cost_fast.apps import cli, train_report
from cost_fast.apps.run_folder import RunFolder
from cost_fast.experiments.dense_data import CITYSCAPES, NYUV2
from cost_fast.experiments.paper import EXPERIMENTS
from cost_fast.metrics import delta_m

# small and quick, COST teleporting once per epoch whatever the data
QUICK = ["--width", "4", "--batch-size", "2", "--workers", "0", "--no-progress"]
TELEPORT = ["--cost-start-epoch", "0", "--trigger", "always", "--teleport-steps", "2"]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    return {
        "cityscapes": write_dense(base / "cityscapes", CITYSCAPES, {"train": 4, "val": 2}),
        "nyuv2": write_dense(base / "nyuv2", NYUV2, {"train": 2, "val": 1}),
        "celeba": write_celeba(base / "celeba", (6, 4, 4)),
    }


def train(*args: str) -> int:
    return cli.main(["train", *args])


@pytest.mark.parametrize("experiment", ["cityscapes", "nyuv2", "celeba"])
def test_two_epochs_on_the_real_layout_with_cost(tmp_path, fixtures, experiment, capsys) -> None:
    out = tmp_path / "run"
    assert (
        train(experiment, "--data", str(fixtures[experiment]), "--epochs", "2", "--out", str(out), *QUICK, *TELEPORT)
        == 0
    )
    assert "done:" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "metrics.csv", "curves.png", "checkpoint.pt", "results.json"} <= names
    history = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert [row["teleports"] for row in history] == [1, 1] and all(0 < row["adapter_steps"] <= 2 for row in history)
    config = json.loads((out / "config.json").read_text())
    spec = EXPERIMENTS[experiment]
    assert config["lr"] == spec.recipe["lr"] and config["method_args"] == {"alpha": 2.0}  # the paper's recipe
    results = json.loads((out / "results.json").read_text())
    higher = spec.metrics()
    if spec.report == "last_10":  # the mean of the (two) epochs' test metrics
        expected = {k: (history[0]["test"][k] + history[1]["test"][k]) / 2 for k in higher}
        baselines = spec.baselines()
        assert results["delta_m"] == pytest.approx(delta_m(expected, baselines, higher))
    else:  # the test metrics of the epoch of the best validation F1; no shipped baselines
        best = max(history, key=lambda row: row["val"]["mean_f1"])
        expected = {k: best["test"][k] for k in higher}
        assert results["delta_m"] is None
    assert {k: results["test"][k] for k in higher} == pytest.approx(expected)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "teleports" in csv_lines[0].split(",")


def test_resume_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path, fixtures) -> None:
    data = str(fixtures["cityscapes"])
    common = [sys.executable, "-m", "cost_fast.apps.cli", "train", "cityscapes", "--data", data, *QUICK, *TELEPORT]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    subprocess.run([*common, "--epochs", "2", "--out", str(whole)], check=True, capture_output=True)
    subprocess.run([*common, "--epochs", "1", "--out", str(parts)], check=True, capture_output=True)
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cost_fast.apps.cli",
            "train",
            "cityscapes",
            "--out",
            str(parts),
            "--resume",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = checkpoint.load(whole / "checkpoint.pt")["run"], checkpoint.load(parts / "checkpoint.pt")["run"]
    for part in ("model", "optimizer", "cost"):
        flat_a, flat_b = train_report.flat_row(a[part]), train_report.flat_row(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key, value in flat_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, flat_b[key]), f"{part} {key}"
            else:
                assert value == flat_b[key], f"{part} {key}"
    rows_a = json.loads((whole / "metrics.json").read_text())
    rows_b = json.loads((parts / "metrics.json").read_text())
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in row_a.items() if k != "seconds"} == {k: v for k, v in row_b.items() if k != "seconds"}


def test_options_come_from_the_config_file_under_the_command_line(tmp_path, fixtures) -> None:
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"lr": 0.01, "batch-size": 3, "method": "mgda", "method_args": {}, "cost": False}))
    out = tmp_path / "run"
    data = str(fixtures["celeba"])
    assert (
        train(
            "celeba",
            "--data",
            data,
            "--config",
            str(config),
            "--lr",
            "0.002",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--width",
            "4",
            "--no-progress",
            "--workers",
            "0",
        )
        == 0
    )
    stored = json.loads((out / "config.json").read_text())
    assert stored["lr"] == 0.002 and stored["batch_size"] == 3 and stored["method"] == "mgda"
    assert stored["method_args"] == {} and stored["cost"] is False  # FairGrad's alpha is not mgda's
    assert json.loads((out / "metrics.json").read_text())[0]["teleports"] == 0


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as caught:
        train(*args)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["celeba"], "give the data folder with --data DIR, or --synthetic"),
        (["celeba", "--synthetic", "--data", "x"], "give the data folder with --data DIR, or --synthetic"),
        (["celeba", "--data", "DATA", "--samples", "3"], "--samples is for --synthetic"),
        (["celeba", "--synthetic", "--method", "nope"], "--method: unknown method 'nope'"),
        (["celeba", "--synthetic", "--method-arg", "beta=1"], "fairgrad does not take"),
        (["celeba", "--synthetic", "--method-arg", "alpha"], "expected NAME=VALUE"),
        (["celeba", "--synthetic", "--model", "segnet"], "CelebA's recipe has one model"),
        (["celeba", "--synthetic", "--epochs", "0"], "--epochs: must be ≥ 1"),
        (["celeba", "--synthetic", "--lr", "-1"], "--lr: must be a finite number > 0"),
        (["celeba", "--synthetic", "--semantics", "x"], "--semantics: 'x' is not one of"),
        (["celeba", "--synthetic", "--device", "tpu"], "--device"),
        (["celeba", "--synthetic", "--config", "MISSING.json"], "--config MISSING.json"),
        (["nyuv2", "--data", "NOWHERE"], "NOWHERE/train: missing"),
        (["celeba", "--synthetic", "--baselines", "MISSING.json"], "--baselines MISSING.json"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, fixtures, monkeypatch, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    args = [str(fixtures["celeba"]) if a == "DATA" else a for a in args]
    assert message in _refused(capsys, *args, "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before any work: no run folder


def test_a_config_file_with_an_unknown_option_is_refused(tmp_path, capsys) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"learning_rate": 0.1}')
    assert "unknown option 'learning_rate'" in _refused(capsys, "celeba", "--synthetic", "--config", str(config))


def test_the_run_folder_is_never_a_folder_of_the_users(tmp_path, capsys, fixtures) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "holds files cost-fast train did not write" in _refused(capsys, "celeba", "--synthetic", "--out", str(mine))
    assert "holds no run of cost-fast train" in _refused(capsys, "celeba", "--out", str(mine), "--resume")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    run = tmp_path / "run"
    args = [
        "celeba",
        "--data",
        str(fixtures["celeba"]),
        "--out",
        str(run),
        "--width",
        "4",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert train(*args, "--epochs", "1") == 0
    (run / "notes.txt").write_text("mine too")
    assert "--resume continues it" in _refused(capsys, *args, "--epochs", "2")
    assert "--lr was 0.0003 there" in _refused(capsys, *args, "--epochs", "2", "--resume", "--lr", "0.1")
    assert "has done its 1 epochs" in _refused(capsys, *args, "--epochs", "1", "--resume")
    assert train(*args, "--epochs", "2", "--resume") == 0
    assert (run / "notes.txt").read_text() == "mine too"
    with pytest.raises(ValueError, match="holds a celeba run"):
        RunFolder(run, resume=True, experiment="nyuv2")


def test_a_run_folder_in_use_is_refused(tmp_path) -> None:
    first = RunFolder(tmp_path / "run", resume=False, experiment="celeba")
    try:
        with pytest.raises(ValueError, match="another cost-fast train is writing to it"):
            RunFolder(tmp_path / "run", resume=True, experiment="celeba")
    finally:
        first.close()
    RunFolder(tmp_path / "run", resume=True, experiment="celeba").close()  # released


def test_reported_results_by_hand() -> None:
    rows = [
        {"epoch": e, "test": {"acc": a}, "val": {"mean_f1": v}, "teleports": 1, "delta_m": None}
        for e, a, v in [(1, 0.5, 10.0), (2, 0.7, 30.0), (3, 0.9, 20.0)]
    ]
    last = train_report.reported(rows, "last_10", {"acc": 0.5}, {"acc": True})
    assert last["test"]["acc"] == pytest.approx(0.7) and last["delta_m"] == pytest.approx(-40.0)
    best = train_report.reported(rows, "best_val", None, {"acc": True})
    assert best["test"] == {"acc": 0.7} and "epoch 2" in best["reported"] and best["teleports"] == 3
    csv = train_report.metrics_csv([{"epoch": 1, "test": {"a": 1.0}}, {"epoch": 2, "test": {"a": 2.0, "b": 3.0}}])
    assert csv.splitlines() == ["epoch,test/a,test/b", "1,1.0,", "2,2.0,3.0"]


def test_a_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(tmp_path, fixtures) -> None:
    import signal
    import time

    data = str(fixtures["cityscapes"])
    args = ["cityscapes", "--data", data, "--epochs", "2", *QUICK, *TELEPORT]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cost_fast.apps.cli", "train", *args, "--out", str(stopped)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (stopped / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == [
        "cost-fast train: terminated (signal 15); its finished epochs are kept (--resume continues)"
    ]
    moved = tmp_path / "moved"
    Path(data).rename(moved)  # the data folder moved meanwhile: --data may say where
    try:
        assert train("cityscapes", "--out", str(stopped), "--resume", "--data", str(moved), "--no-progress") == 0
        whole = tmp_path / "whole"
        assert train(*[str(moved) if a == data else a for a in args], "--out", str(whole)) == 0
    finally:
        moved.rename(data)
    rows = [json.loads((folder / "metrics.json").read_text()) for folder in (stopped, whole)]
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in run] for run in rows]
    assert strip[0] == strip[1]
