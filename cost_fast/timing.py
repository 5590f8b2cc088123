"""Per-phase timings that are true on a GPU.

On CUDA, kernels run asynchronously: ``time.perf_counter()`` around a phase measures how long it
took to launch its kernels, not to run them. ``PhaseTimer`` records a pair of CUDA events around
each phase instead (elapsed device time), and reads them only when asked (``seconds()``), which
waits for those events and nothing else; on other devices it uses ``time.perf_counter()``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class PhaseTimer:
    """Named phases, timed on ``device``: ``with timer.phase("gradients"): ...``; a phase timed
    twice adds up. ``seconds()`` returns {name: seconds}."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._device = device
        self._cpu: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self._device))
            try:
                yield
            finally:
                end.record(torch.cuda.current_stream(self._device))
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._cpu[name] = self._cpu.get(name, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """{phase: seconds} (on CUDA: device time; waits for the recorded events)."""
        out = dict(self._cpu)
        for name, start, end in self._events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out
