"""Device, versions and date stamped on every benchmark result."""

from __future__ import annotations

import datetime
import os
import platform

import torch

# Peak HBM bandwidth in bytes/s, by substring of the CUDA device name (vendor data sheets).
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def device_name(device: torch.device) -> str:
    """A readable name of the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth of a known GPU in bytes/s, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def stamp(device: torch.device) -> dict:
    """Device, library versions and UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
