"""Counting what a piece of work launches and reads, device-independently, on CPU.

``LaunchCount`` is a ``TorchDispatchMode``: every aten operator dispatched inside it counts as
one op (about one kernel launch on CUDA), except views and allocations, which launch nothing
(``FREE``). Work on host copies (``cost_fast.host.section``: a method's solve on the host's M)
is counted apart as ``host_ops``. Device reads are the ``_local_scalar_dense`` calls outside
host sections (``.item()``, ``float(t)``, ``bool(t)``: a device synchronisation each on CUDA)
plus the transfers of ``cost_fast.host.to_host`` (one each).
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from cost_fast import host

FREE = frozenset(
    "view _unsafe_view as_strided empty empty_strided detach alias t transpose expand unsqueeze squeeze "
    "permute select slice reshape _reshape_alias lift_fresh new_empty empty_like split unbind "
    "split_with_sizes chunk".split()
)


class LaunchCount(TorchDispatchMode):
    """Counts of the work done inside the block (module docstring): ``ops``, ``host_ops``,
    ``reads`` and ``names`` (ops per operator)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.host_ops = self.scalar_reads = 0
        self.names: Counter[str] = Counter()
        self._transfers = 0

    def __enter__(self):
        self._transfers = host.transfers
        return super().__enter__()

    def __exit__(self, *exc):
        self._transfers = host.transfers - self._transfers
        return super().__exit__(*exc)

    @property
    def reads(self) -> int:
        """Device reads: scalar reads outside host sections and host transfers."""
        return self.scalar_reads + self._transfers

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if host.in_section():
            self.host_ops += name not in FREE
        else:
            if name == "_local_scalar_dense":
                self.scalar_reads += 1
            elif name not in FREE:
                self.ops += 1
                self.names[name] += 1
        return func(*args, **(kwargs or {}))
