"""What a teleport is measured by: the task losses over the teleport data, before and after.

    L*_i = mean over the teleport data of L_i(θ)                  (``loss_contour``, float64)
    e    = max_i |L_i(θ+Δθ) - L*_i| / max(|L*_i|, floor)          (``level_set_error``)

Every teleport runs with the model in eval mode (``eval_mode``: BatchNorm uses its running
statistics and updates none of them, Dropout is off), as in the public code, and every module
gets back the mode it had.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cost_fast.teleport.perturbed import LossFn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; then every module gets back its own training flag (a
    model in train mode may hold modules the user keeps in eval mode, e.g. frozen BatchNorm)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def loss_contour(model: nn.Module, loss_fn: LossFn, data: Iterable[Any]) -> torch.Tensor:
    """L*: the mean of the task losses over ``data``, accumulated and returned in float64 (no
    grad; the caller sets train/eval mode)."""
    total, count = None, 0
    for batch in data:
        losses = loss_fn(model, batch).detach().double()
        total = losses if total is None else total + losses
        count += 1
    if count == 0:
        raise ValueError("the teleport data yielded no batch")
    return total / count


def level_set_error(before: torch.Tensor, after: torch.Tensor, floor: float) -> float:
    """e = max_i |after_i - before_i| / max(|before_i|, floor) in float64 (inf if ``after`` is
    not finite)."""
    before, after = before.double(), after.double()
    if not bool(torch.isfinite(after).all()):
        return float("inf")
    return float(((after - before).abs() / before.abs().clamp_min(floor)).max())
