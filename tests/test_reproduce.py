"""The reproduction report: verdicts follow the measurements; the command writes the folder."""

from __future__ import annotations

import json
from pathlib import Path

from cost_fast.apps.reproduce import assess, render, run_reproduction, summarize


def demo_report(conflict_base, conflict_cost, teleports, steps):
    run = {"conflict_ratio": conflict_base, "teleports": [], "steps": [], "seconds": {"gradients": 1.0}}
    cost = {
        "conflict_ratio": conflict_cost,
        "teleports": teleports,
        "steps": steps,
        "seconds": {"gradients": 1.0, "teleport": 0.5},
    }
    return {
        "runs": {"base": run, "base+COST": cost},
        "method": "fairgrad",
        "semantics": "reference",
        "epochs": 3,
        "seed": 0,
    }


def toy_report(ls, cost, teleports=1, tolerance=None):
    attempted = [{"rolled_back": False, "level_set_error": 0.01}] * teleports
    runs = [
        {"LS": {"reaches_front": a, "init": [float(k), 0.0]}, "LS+COST": {"reaches_front": b, "teleports": attempted}}
        for k, (a, b) in enumerate(zip(ls, cost))
    ]
    return {"runs": runs, "steps": 10, "lr": 0.01, "semantics": "public", "level_set_tolerance": tolerance}


def control_report(paper_rise: float, drift: float) -> dict:
    def run(rise):
        return {"task_terms": [1.0, 1.0, 1.0], "sharpness_terms": [1.0, 1.0, 1.0 + rise]}

    return {"relative_radius": 0.1, "runs": {"0.1": run(paper_rise), "0.0": run(drift), "10.0": run(10 * drift)}}


def test_verdicts_follow_the_measurements() -> None:
    teleport = {"step": 5, "rolled_back": False, "task_terms": [3.0, 2.0, 1.0], "sharpness_terms": [1.0, 2.0, 3.0]}
    steps = [[s, 0.1, 4 if s < 5 else 1, 1.0 if s < 5 else 2.0] for s in range(10)]  # fewer pairs, larger ‖g0‖ after
    good = assess(
        demo_report([0.9, 0.8, 0.8], [0.9, 0.2, 0.1], [teleport], steps),
        toy_report([False, True, True, True, True], [True] * 5),
    )
    assert [c["verdict"] for c in good] == ["held", "held", "held", "held", "not measurable here"]
    assert "+50.0%" in good[4]["measured"] and good[4]["value"] == 50.0
    assert all(c["rule"] for c in good)
    assert "rescued (0.0, 0.0); lost none" in good[3]["measured"] and "median 0.01, max 0.01" in good[3]["measured"]
    # a start rescued and another lost: not held (seeds 2 and 4 of the committed reproduction)
    traded = assess(
        demo_report([0.5], [0.5], [], []),
        toy_report([False, True, True], [True, False, True]),
        toy_level_set=toy_report([False, True, True], [True, True, True], tolerance=0.05),
        load=1.5,
    )
    assert traded[3]["verdict"] == "not held" and "lost (1.0, 0.0)" in traded[3]["measured"]
    assert "level-set error ≤ 0.05" in traded[4]["claim"] and traded[4]["verdict"] == "held"
    assert "load average 1.50" in traded[5]["measured"]
    bad_teleport = {**teleport, "task_terms": [1.0, 2.0, 3.0], "sharpness_terms": [3.0, 2.0, 1.0]}
    worse_steps = [[s, 0.1, 1 if s < 5 else 4, 2.0 if s < 5 else 1.0] for s in range(10)]
    bad = assess(
        demo_report([0.2, 0.1, 0.1], [0.9, 0.8, 0.8], [bad_teleport], worse_steps),
        toy_report([True] * 5, [True] * 5, teleports=0),
    )
    assert [c["verdict"] for c in bad][:4] == ["not held"] * 4
    none = assess(demo_report([0.5, 0.5], [0.5, 0.5], [], []), toy_report([True] * 5, [True] * 5, 0))
    assert none[1]["verdict"] == none[2]["verdict"] == "not measurable here"
    # the sharpness term: held only if it adds ≥ 10% to the rise that the drift alone gives
    held = assess(demo_report([0.5], [0.5], [], []), toy_report([True], [True]), control_report(0.5, 0.2))
    inert = assess(demo_report([0.5], [0.5], [], []), toy_report([True], [True]), control_report(0.201, 0.2))
    assert held[4]["verdict"] == "held" and inert[4]["verdict"] == "not held"
    rows = summarize([good, bad, good])
    assert rows[4]["median"] == 50.0 and rows[4]["range"] == (50.0, 50.0) and rows[0]["median"] is None
    assert [r["verdict"] for r in rows][:2] == ["mixed", "mixed"] and rows[0]["held"] == 2
    assert rows[4]["verdict"] == "not measurable here" and rows[0]["measurable"] == 3
    assert summarize([good, good])[0]["verdict"] == "held" and summarize([bad])[0]["verdict"] == "not held"
    text = render(rows, demo_report([0.9], [0.1], [], []), toy_report([True], [True]))
    assert text.count("\n| ") == 1 + 5 and "| claim | rule of the verdict |" in text and "held in 2 of 3" in text
    assert "median +50.0% over the seeds, from +50.0% to +50.0%" in text
    assert text.count("  - seed ") == 5 * 3


def test_quick_reproduction_writes_the_report_its_verdicts_follow(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    rows = run_reproduction(str(out), quick=True, seeds=2)
    assert len(rows) == 7 and all(r["seeds"] == 2 for r in rows)
    assert (out / "REPRODUCTION.md").read_text().count("\n| ") == 8
    per_seed = []
    for seed in (0, 1):
        where = out / f"seed{seed}"
        demo = json.loads((where / "demo" / "metrics.json").read_text())
        toy = json.loads((where / "toy" / "toy.json").read_text())
        toy_level_set = json.loads((where / "toy_level_set" / "toy.json").read_text())
        control = json.loads((where / "sharpness_control.json").read_text())
        assert (where / "toy" / "toy.png").exists() and (where / "toy_level_set" / "toy.png").exists()
        per_seed.append(assess(demo, toy, control, toy_level_set))
    # every verdict is the one the written measurements give, row by row
    expected = summarize(per_seed)
    assert [(r["claim"], r["verdict"], r["held"], r["measurable"]) for r in rows] == [
        (r["claim"], r["verdict"], r["held"], r["measurable"]) for r in expected
    ]
    report = (out / "REPRODUCTION.md").read_text()
    for row in rows:
        assert f"| {row['claim']} |" in report and row["verdict"] in report
