"""The CAGrad toy: its losses against hand-computed values, the Pareto front, and a tiny report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cost_fast.apps.cli import main
from cost_fast.apps.report import MARKER
from cost_fast.apps.toy import pareto_front, reaches_front, run_toy, toy_losses


def hand_losses(x1: float, x2: float) -> tuple[float, float]:
    c1, c2 = max(math.tanh(x2 / 2), 0), max(math.tanh(-x2 / 2), 0)
    log1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
    log2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
    sq1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    sq2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return log1 * c1 + sq1 * c2, log2 * c1 + sq2 * c2


@pytest.mark.parametrize("point", [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (3.0, -4.0), (1.0, 2.0)])
def test_toy_losses_match_the_formula(point: tuple[float, float]) -> None:
    got = toy_losses(torch.tensor(point, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(hand_losses(*point), dtype=torch.float64))


def test_pareto_front_is_non_dominated_and_tolerance_check() -> None:
    front = pareto_front(resolution=201)
    assert (front[1:, 0] >= front[:-1, 0]).all() and (front[1:, 1] < front[:-1, 1]).all()
    assert reaches_front(front[len(front) // 2], front, 1e-9)
    assert not reaches_front(front[len(front) // 2] + 1.0, front, 0.05)  # dominated by that front point


def test_toy_report(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    report = run_toy(str(out), steps=30, steps_per_epoch=10)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "toy.json", "toy.png", "toy_table.md"]
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "toy.json").read_text())
    assert len(saved["runs"]) == 5
    for run in saved["runs"]:
        for name in ("LS", "LS+COST"):
            assert len(run[name]["path"]) == 4 and saved["path_every"] == 10  # steps 0, 10, 20 and the last
            assert all(math.isfinite(v) for v in run[name]["final_losses"])
            assert isinstance(run[name]["reaches_front"], bool)
    table = (out / "toy_table.md").read_text().splitlines()
    assert len(table) == 2 + 5
    assert report["runs"][0]["LS"]["init"] == [-8.5, 7.5] and len(report["runs"][0]["LS"]["path"]) == 31
    assert report["protocol"] == "nash-mtl" and report["lr"] == 0.01


def test_every_attempted_teleport_is_recorded_with_its_outcome(tmp_path: Path) -> None:
    from cost_fast.apps.toy import train_toy

    run = train_toy((-7.5, -0.5), use_cost=True, steps=60, lr=0.01, steps_per_epoch=10)
    attempted = run["teleports"]
    assert [t["step"] for t in attempted] == [0, 10, 20, 30, 40, 50]  # the trigger fires there at once
    keys = {"step", "point", "rolled_back", "rollback_reason", "level_set_error", "merged_fraction", "mean_grad_norm"}
    assert all(set(t) == keys for t in attempted)
    assert all(t["level_set_error"] >= 0 and t["merged_fraction"] == 1 for t in attempted)
    assert all(t["rolled_back"] == (t["rollback_reason"] is not None) for t in attempted)
    assert not any(t["rolled_back"] for t in attempted)  # public semantics: no guard, as the public code
    with pytest.raises(ValueError, match="protocol"):
        run_toy(str(tmp_path / "t"), protocol="fig6")


def test_cli_toy_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--steps", "0"])
    assert exit_info.value.code == 2
    for bad in ("-1", "nan", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["toy", "--level-set-tolerance", bad])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["toy", "--out", "/nonexistent/dir/toy"])
    assert "cannot write the report folder" in capsys.readouterr().err


def test_a_loss_preserving_toy_run_keeps_every_merged_teleport_within_its_tolerance(tmp_path: Path) -> None:
    report = run_toy(str(tmp_path / "toy"), steps=150, steps_per_epoch=30, level_set_tolerance=0.05)
    merged = [t for run in report["runs"] for t in run["LS+COST"]["teleports"] if not t["rolled_back"]]
    assert merged and all(t["level_set_error"] <= 0.05 for t in merged)
    assert report["level_set_tolerance"] == 0.05
    table = (tmp_path / "toy" / "toy_table.md").read_text()
    assert "level-set error of the merged teleports" in table
    with pytest.raises(ValueError, match="level_set_tolerance"):
        run_toy(str(tmp_path / "bad"), steps=10, level_set_tolerance=-1.0)
    assert not (tmp_path / "bad").exists()
