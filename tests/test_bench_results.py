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
