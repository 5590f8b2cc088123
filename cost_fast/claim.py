"""One COST per optimizer: the parts of a COST that register hooks are held in an
``OptimizerClaim``, so that a newer COST over the same optimizer (a notebook cell run again, a
retry after an error) closes the earlier one's parts instead of stacking their hooks, even when
the earlier COST object is gone."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch

# The live claim of each optimizer; weak, so that an optimizer nobody holds is freed.
_CLAIMS: weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerClaim] = weakref.WeakKeyDictionary()


class OptimizerClaim:
    """The ``close`` methods of the parts one COST registered hooks for (``take``), called by
    ``release``. The claim holds only weak references, to the optimizer and to the parts (whose
    hooks keep them alive while they are registered), so it keeps nothing alive.

    Args:
        optimizer: the optimizer the COST steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._closers: list[weakref.WeakMethod] = []
        self.closed = False

    def take(self, closers: list[Callable[[], None]]) -> None:
        """Hold the parts' ``close`` methods and become the optimizer's claim; an earlier live
        claim is released first, with a warning (its COST can no longer step)."""
        optimizer = self._optimizer()
        earlier = _CLAIMS.get(optimizer)
        if earlier is not None and not earlier.closed:
            earlier.release()
            warnings.warn(
                "an earlier COST over this optimizer was closed (its hooks removed; it can no longer step): "
                "one COST holds an optimizer at a time",
                UserWarning,
                stacklevel=3,
            )
        self._closers = [weakref.WeakMethod(close) for close in closers]
        _CLAIMS[optimizer] = self

    def release(self) -> None:
        """Close every part held (their hooks are removed); the claim is closed. Releasing twice
        does nothing."""
        for closer in self._closers:
            close = closer()
            if close is not None:
                close()
        self._closers = []
        self.closed = True
        optimizer = self._optimizer()
        if optimizer is not None and _CLAIMS.get(optimizer) is self:
            del _CLAIMS[optimizer]
