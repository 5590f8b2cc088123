"""Committed benchmark results are stamped, and the report script reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_fast.bench.report import plot, table

FOLDER = Path(__file__).parents[1] / "bench" / "results"
# measurements that are not timings (no pytest-benchmark rows), each with its own test below
MEASUREMENTS = {"toy_level_set_cpu.json"}
RESULTS = sorted(p for p in FOLDER.glob("*.json") if p.name not in MEASUREMENTS)


def test_results_exist() -> None:
    assert RESULTS, "bench/results/ holds no JSON"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_result_is_stamped_and_reportable(path: Path, tmp_path: Path) -> None:
    data = json.loads(path.read_text())
    stamp = data["stamp"]
    for key in ("device", "device_type", "torch", "triton", "date"):
        assert stamp.get(key), f"{path.name}: stamp lacks {key}"
    assert path.stem.endswith("_" + stamp["device_type"]), "file name and device disagree"
    for bench in data["benchmarks"]:
        assert bench["stats"]["median"] > 0 and bench["extra_info"]["impl"]
    assert ("device reads" if path.stem.startswith("launches_") else "speed-up") in table(path)
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    png = plot(copy)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teleport_overhead_projection(tmp_path: Path) -> None:
    from cost_fast.bench.report import teleport_overhead

    def row(impl, median, **info):
        return {"group": "epoch x", "name": impl, "stats": {"median": median}, "extra_info": {"impl": impl, **info}}

    rows = [
        row("base", 2.0, workload="celeba", teleport_in_base_epochs=None),
        row("cost_fast", 3.0, workload="celeba", teleports=1, adapter_steps=40, teleport_in_base_epochs=0.5),
    ]
    path = tmp_path / "epoch_cpu.json"
    path.write_text(json.dumps({"stamp": {}, "benchmarks": rows}))
    text = teleport_overhead(path)
    # one teleport = 0.5 base epochs: +50% with one every epoch, +10% every 5, +5% every 10
    assert "| celeba | cost_fast | 2.000 | 3.000 | 1 | 40 | 0.500 | +50.0% | +10.0% | +5.0% |" in text
    other = tmp_path / "solvers_cpu.json"  # results without teleports get no such table
    other.write_text(json.dumps({"benchmarks": [row("ours", 1.0, workload="w")]}))
    assert teleport_overhead(other) == ""


def test_toy_level_set_measurement_backs_the_readme() -> None:
    data = json.loads((FOLDER / "toy_level_set_cpu.json").read_text())
    for key in ("device", "device_type", "torch", "date"):
        assert data["stamp"].get(key)
    variants = data["variants"]
    for variant in variants.values():
        merged = [t for run in variant["teleports"] for t in run if not t["rolled_back"]]
        assert variant["summary"]["merged"] == len(merged)
        if variant["level_set_tolerance"] is not None:  # loss-preserving: every merged one within it
            assert all(t["level_set_error"] <= variant["level_set_tolerance"] for t in merged)
    # without L_g the adapter never moves: every teleport has level-set error 0
    assert variants["public_no_sharpness"]["summary"]["max_error"] == 0
    # the public code's teleports leave the level set; neither a dominant L_t nor a smaller lr keeps them on it
    for name in ("public", "public_task_weight_1000", "public_adapter_lr_1e-3"):
        assert variants[name]["summary"]["max_error"] > 1 and variants[name]["summary"]["share_above_0.05"] > 0.1
    # Fig. 6 with loss-preserving teleports: LS + COST loses a start LS reaches and rescues none
    ls = data["ls_reaches_front"]
    kept = variants["public_level_set_0.05"]["reaches_front"]
    assert any(a and not b for a, b in zip(ls, kept)) and not any(b and not a for a, b in zip(ls, kept))
    assert all(variants["public"]["reaches_front"])


def test_launch_counts_back_the_docs() -> None:
    """docs/benchmarks.md and docs/cost.md quote these: a COST step reads the device at most
    twice outside the optimizer and launches under 2,000 ops at K = 40; an adapter step reads
    nothing and, with the n samples in one pass (the CUDA default), launches fewer ops than the
    plain model's passes it is made of; the split walks the heads once."""
    rows = {
        (b["extra_info"]["workload"], b["extra_info"]["impl"]): b["extra_info"]
        for b in json.loads((FOLDER / "launches_cpu.json").read_text())["benchmarks"]
    }
    for workload in ("celeba", "nyuv2"):
        assert rows[workload, "base_step"]["reads"] <= 2
        assert rows[workload, "adapter_step"]["reads"] == 0
        assert rows[workload, "adapter_step_batched"]["ops"] < rows[workload, "adapter_step_floor"]["ops"]
    assert rows["celeba", "base_step"]["ops"] < 2000
    assert rows["celeba", "task_gradients_split"]["ops"] < rows["celeba", "task_gradients_loop"]["ops"] / 3
