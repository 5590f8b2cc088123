"""What a step reads back from the device to the host, in one place.

On a GPU every read of a device value (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a
copy to the CPU) waits for the device to finish the work queued before it. COST's ordinary
step reads twice: once for its decision (the trigger, whether the losses and gradients are
finite, the statistics it reports, and the Gram matrix M for the solve, in one transfer:
``to_host``) and once to check the update finite before it is added to ``.grad``. The K x K
solves of the methods run on that host copy of M, in float64 (``section``): their many small
reads are the host's own and wait for nothing.

``transfers`` counts the calls of ``to_host`` (for the launch counts of ``bench/test_bench_launches.py``
and the tests); ``in_section()`` says whether the current code runs on host copies.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_STATE = threading.local()
transfers = 0  # calls of to_host so far, in this process


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a float64 tensor on the CPU: one transfer (a copy where it is elsewhere or
    of another dtype; ``tensor`` itself, detached, where it is a CPU float64 tensor)."""
    global transfers
    transfers += 1
    return tensor.detach().to(device="cpu", dtype=torch.float64)


@contextlib.contextmanager
def section() -> Iterator[None]:
    """A block of work on host copies (a method's solve on the host's M)."""
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def in_section() -> bool:
    """Whether the current thread is inside ``section()``."""
    return getattr(_STATE, "depth", 0) > 0
