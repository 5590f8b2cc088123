"""The reproduction report: verdicts follow the measurements; the command writes the folder."""

from __future__ import annotations

from pathlib import Path

from cost_fast.reproduce import assess, render, run_reproduction


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


def toy_report(ls, cost, teleports=1):
    runs = [
        {"LS": {"reaches_front": a}, "LS+COST": {"reaches_front": b, "teleports": [{}] * teleports}}
        for a, b in zip(ls, cost)
    ]
    return {"runs": runs, "steps": 10, "lr": 0.01}


def test_verdicts_follow_the_measurements() -> None:
    teleport = {"step": 5, "rolled_back": False, "task_terms": [3.0, 2.0, 1.0], "sharpness_terms": [1.0, 2.0, 3.0]}
    steps = [[s, 0.1, 4 if s < 5 else 1, 1.0 if s < 5 else 2.0] for s in range(10)]  # fewer pairs, larger ‖g0‖ after
    good = assess(
        demo_report([0.9, 0.8, 0.8], [0.9, 0.2, 0.1], [teleport], steps),
        toy_report([False, True, True, True, True], [True] * 5),
    )
    assert [c["verdict"] for c in good] == ["held", "held", "held", "held", "not measurable here"]
    assert "+50.0%" in good[4]["measured"]
    bad_teleport = {**teleport, "task_terms": [1.0, 2.0, 3.0], "sharpness_terms": [3.0, 2.0, 1.0]}
    worse_steps = [[s, 0.1, 1 if s < 5 else 4, 2.0 if s < 5 else 1.0] for s in range(10)]
    bad = assess(
        demo_report([0.2, 0.1, 0.1], [0.9, 0.8, 0.8], [bad_teleport], worse_steps),
        toy_report([True] * 5, [True] * 5, teleports=0),
    )
    assert [c["verdict"] for c in bad][:4] == ["not held"] * 4
    none = assess(demo_report([0.5, 0.5], [0.5, 0.5], [], []), toy_report([True] * 5, [True] * 5, 0))
    assert none[1]["verdict"] == none[2]["verdict"] == "not measurable here"
    text = render(good, demo_report([0.9], [0.1], [], []), toy_report([True], [True]))
    assert text.count("\n| ") == 1 + 5 and "| claim |" in text


def test_quick_reproduction_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "repro"
    claims = run_reproduction(str(out), quick=True)
    assert len(claims) == 5 and all(c["verdict"] in ("held", "not held", "not measurable here") for c in claims)
    assert (out / "REPRODUCTION.md").read_text().count("\n| ") == 6
    assert (out / "demo" / "metrics.json").exists() and (out / "toy" / "toy.png").exists()
