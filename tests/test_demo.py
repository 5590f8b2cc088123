"""The demo (README's main job) at a small size: the report folder, its numbers and plots, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cost_fast.apps.cli import main
from cost_fast.apps.demo import NUM_TASKS, TASK_NAMES, digits_tasks, plot_specs, run_demo
from cost_fast.apps.report import MARKER
from cost_fast.metrics import delta_m

PLOTS = ["task_losses.png", "conflict_ratio.png", "teleports.png", "test_accuracy.png", "time_split.png"]


def test_digits_tasks_are_one_vs_rest() -> None:
    x_train, y_train, x_test, y_test = digits_tasks()
    assert x_train.shape[1] == 64 and y_train.shape[1] == NUM_TASKS
    assert len(x_train) + len(x_test) == 1797
    assert torch.equal(y_train.sum(1), torch.ones(len(y_train)))  # exactly one positive task per image
    assert abs(x_train.mean().item()) < 1e-5  # standardized on the training split


def test_demo_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = run_demo(str(out), epochs=3, stream=None)
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS + ["metrics.json", MARKER])
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for run in saved["runs"].values():
        assert len(run["train_loss"]) == 3 and all(len(e) == NUM_TASKS for e in run["train_loss"])
        assert all(math.isfinite(v) and v >= 0 for e in run["train_loss"] for v in e)
        assert sum(run["train_loss"][-1]) < sum(run["train_loss"][0])  # it learns
        assert all(0 <= r <= 1 for r in run["conflict_ratio"])
        assert all(0.8 <= a <= 1 for a in run["test_accuracy"])  # one-vs-rest digits are easy
        assert run["seconds"]["gradients"] > 0
    baselines = saved["single_task"]["test_accuracy"]
    assert len(baselines) == NUM_TASKS and all(0.8 <= a <= 1 for a in baselines)
    for run in saved["runs"].values():
        assert run["tasks"] == list(TASK_NAMES) == [f"digit_{d}" for d in range(10)]  # through StepInfo
        by_name = dict(zip(TASK_NAMES, run["test_accuracy"]))
        expected = delta_m(by_name, dict(zip(TASK_NAMES, baselines)), dict.fromkeys(TASK_NAMES, True))
        assert run["delta_m"] == pytest.approx(expected, rel=1e-12)
        by_hand = 100 * sum((b - a) / b for a, b in zip(run["test_accuracy"], baselines)) / NUM_TASKS
        assert run["delta_m"] == pytest.approx(by_hand, rel=1e-9)
    assert saved["runs"]["base"]["teleports"] == []
    events = saved["runs"]["base+COST"]["teleports"]
    assert 1 <= len(events) <= 2  # at most one per epoch, none in the first
    for e in events:
        assert e["epoch"] >= 1 and len(e["task_terms"]) == len(e["sharpness_terms"]) > 0
        assert e["rolled_back"] or e["htr"] in ("modulated", "reset")
        assert e["level_set_error"] >= 0 and e["merged_fraction"] == 1  # measured, the whole ΔW merged


def fake_report(epochs: int, accuracy: list[float], events: list[dict]) -> dict:
    run = {
        "tasks": list(TASK_NAMES),
        "delta_m": -1.5,
        "train_loss": [[0.5] * NUM_TASKS] * epochs,
        "conflict_ratio": [0.5] * epochs,
        "test_accuracy": accuracy,
        "seconds": {"gradients": 1.0, "teleport": 2.0},
        "teleports": [],
    }
    return {
        "epochs": epochs,
        "runs": {"base": run, "base+COST": {**run, "teleports": events}},
        "single_task": {"test_accuracy": [0.7] * NUM_TASKS},
    }


def test_plots_say_what_they_show() -> None:
    event = {
        "epoch": 0,
        "rolled_back": True,
        "rollback_reason": "loss rose",
        "task_terms": [1.0],
        "sharpness_terms": [2.0],
        "level_set_error": 0.123,
    }
    specs = plot_specs(fake_report(1, [0.51, 0.55, 0.6, 0.62, 0.64, 0.66, 0.67, 0.68, 0.69, 0.6], [event]))
    low, high = specs["test_accuracy.png"]["ylim"]
    assert low < 0.51 and high > 0.70 and high <= 1.0  # every point visible, the single-task ones too
    assert specs["test_accuracy.png"]["tasks"] == specs["task_losses.png"]["tasks"] == list(TASK_NAMES)
    assert list(specs["test_accuracy.png"]["series"]) == ["base", "base+COST", "single-task"]
    assert "Δm%" in specs["test_accuracy.png"]["title"] and "-1.50" in specs["test_accuracy.png"]["title"]
    assert specs["task_losses.png"]["marker"] == "o"  # one epoch: points, not an empty line
    assert "one run" in specs["time_split.png"]["title"]  # not presented as a benchmark
    assert list(specs["teleports.png"]["series"]) == ["epoch 0, level-set error 0.12 (rolled back: loss rose)"]
    for spec in specs.values():
        assert spec["title"] and spec["xlabel"]
    assert plot_specs(fake_report(3, [0.9] * NUM_TASKS, []))["task_losses.png"]["marker"] is None


def test_cli_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--method", "mgda", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mean test accuracy" in text and "report:" in text and (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--epochs", "-1"],
        ["demo", "--epochs", "0"],
        ["demo", "--semantics", "both"],
        ["demo", "--device", "nope"],
        ["demo", "--method", "nope"],
        ["demo", "--method", "moco"],
        ["demo", "--out", "/nonexistent/dir/report"],
        [],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
