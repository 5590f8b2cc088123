"""pytest-benchmark hooks: stamp results with device/versions/date and add achieved bandwidth."""

from __future__ import annotations

from cost_fast.bench.stamp import bench_device, peak_bandwidth, stamp


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    device = bench_device()
    output_json["stamp"] = stamp(device)
    peak = peak_bandwidth(device)
    for bench in output_json["benchmarks"]:
        extra = bench["extra_info"]
        if "bytes" in extra:
            extra["gb_per_s"] = extra["bytes"] / bench["stats"]["median"] / 1e9
            if peak is not None:
                extra["fraction_of_peak_bandwidth"] = extra["bytes"] / bench["stats"]["median"] / peak
