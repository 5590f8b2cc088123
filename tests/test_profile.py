"""`cost-fast profile` at a tiny size: the report folder, its traces and summary, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_fast.cli import main
from cost_fast.profile import run_profile

PHASES = ["step_fast", "step_reference", "teleport_fast", "teleport_reference"]


def test_profile_writes_a_complete_report(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "stale.txt").write_text("old")  # an existing report is replaced whole
    run_profile(target, num_tasks=3, width=2, batch_size=2, rows=3)
    assert sorted(p.name for p in target.iterdir()) == sorted([f"{p}.trace.json" for p in PHASES] + ["summary.txt"])
    for phase in PHASES:
        trace = json.loads((target / f"{phase}.trace.json").read_text())
        assert trace["traceEvents"]
    summary = (target / "summary.txt").read_text()
    for phase in PHASES:
        assert f"== {phase}: " in summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]  # no staging left


def test_profile_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="not a writable directory"):
        run_profile(tmp_path / "missing" / "report", num_tasks=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--out", str(tmp_path / "missing" / "report"), "--tasks", "2"])
    assert exit_info.value.code == 2 and "not a writable directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--tasks", "0"])
