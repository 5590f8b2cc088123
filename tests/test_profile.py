"""`cost-fast profile` at a tiny size: the report folder, its traces and summary, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_fast.apps import report
from cost_fast.apps.cli import main
from cost_fast.apps.profile import run_profile
from cost_fast.apps.report import MARKER

PHASES = ["step_fast", "step_yardstick", "teleport_fast", "teleport_yardstick"]


def test_profile_writes_a_complete_report(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "stale.txt").write_text("old")  # a previous report of ours is replaced whole
    report._write_marker(target, "id previous", ["stale.txt"])
    run_profile(target, num_tasks=3, width=2, batch_size=2, rows=3)
    expected = [f"{p}.trace.json" for p in PHASES] + ["summary.txt", MARKER]
    assert sorted(p.name for p in target.iterdir()) == sorted(expected)
    for phase in PHASES:
        trace = json.loads((target / f"{phase}.trace.json").read_text())
        assert trace["traceEvents"]
    summary = (target / "summary.txt").read_text()
    for phase in PHASES:
        assert f"== {phase}: " in summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # no staging left


def test_profile_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        run_profile(tmp_path / "missing" / "report", num_tasks=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--out", str(tmp_path / "missing" / "report"), "--tasks", "2"])
    assert exit_info.value.code == 2 and "cannot write the report folder" in capsys.readouterr().err
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="never overwritten"):
        run_profile(user, num_tasks=2)
    assert (user / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="batch size must be ≥ 2"):
        run_profile(tmp_path / "r", num_tasks=2, batch_size=1)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        run_profile(tmp_path / "r", num_tasks=2, device="meta")
    with pytest.raises(SystemExit):
        main(["profile", "--tasks", "0"])
