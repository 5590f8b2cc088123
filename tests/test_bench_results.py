"""Committed benchmark results are stamped, and the report script reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cost_fast.bench.report import plot, table

RESULTS = sorted((Path(__file__).parents[1] / "bench" / "results").glob("*.json"))


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
    assert "speed-up" in table(path)
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
