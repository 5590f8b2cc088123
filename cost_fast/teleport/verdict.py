"""Whether a teleport stays: the one verdict path of every teleport kind (``settle``).

A teleport has moved the backbone (the adapter's merge of ΔW, or the rescaling's group action).
``settle`` then decides, in this order:

1. anything the teleport computed is not finite (its adapter steps, L*, ΔW, the moved weights):
   "non-finite", no pass over the data;
2. where the data is evaluated after the move (``TeleportConfig.evaluates_after``: the level-set
   error is measured, the guard is on, or the teleport is loss-preserving), the level-set error
   e; a loss-preserving teleport that can shrink its move (the adapter: W + t·ΔW) halves t
   while e > ``level_set_tolerance``, at most ``level_set_halvings`` times;
3. ``merge_verdict``: "non-finite" if the losses after are not finite, "left the level set" if
   e > ``level_set_tolerance``, else the guard's verdict where the guard is on: "loss rose"
   if some task's mean loss rose by more than ``guard_tolerance``·|L*_i|.

A teleport with a reason is rolled back bit-exactly, and its Δθ reported as zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from cost_fast.teleport.config import TeleportConfig
from cost_fast.teleport.contour import level_set_error
from cost_fast.teleport.semantics import Semantics


@dataclasses.dataclass
class Verdict:
    """What ``settle`` decided: ``deltas`` (Δθ of the move kept, zeros after a rollback), the
    ``reason`` of a rollback (None: the teleport stays), the contour ``after`` the move (None when
    nothing evaluated it), its level-set ``error`` and the ``fraction`` t of the move kept."""

    deltas: list[torch.Tensor]
    reason: str | None
    after: torch.Tensor | None
    error: float | None
    fraction: float


def settle(
    config: TeleportConfig,
    semantics: Semantics,
    *,
    before: torch.Tensor | None,
    move: Callable[[float], list[torch.Tensor]],
    finite: Callable[[list[torch.Tensor]], bool],
    measure: Callable[[], torch.Tensor],
    rollback: Callable[[], None],
    shrinkable: bool,
) -> Verdict:
    """Decide a teleport (module docstring). ``move(t)`` moves the backbone by t times the
    teleport's update from where it started and returns Δθ (t = 1 first; only a ``shrinkable``
    teleport is asked for less, after a ``rollback``); ``finite(deltas)`` says whether everything
    the teleport computed is finite; ``measure()`` is the contour at the current point;
    ``before`` is L* (None when ``config.evaluates_after(semantics)`` is False); ``rollback()``
    puts the backbone back bit-exactly."""
    deltas = move(1.0)
    after, error, fraction, reason = None, None, 1.0, None
    if not finite(deltas):
        reason = "non-finite"
    elif config.evaluates_after(semantics):
        after = measure()
        error = level_set_error(before, after, config.level_set_floor)
        tolerance = config.level_set_tolerance
        if tolerance is not None and shrinkable:
            halvings = 0
            while error > tolerance and halvings < config.level_set_halvings:
                halvings += 1
                fraction = 0.5**halvings
                rollback()
                deltas = move(fraction)
                after = measure()
                error = level_set_error(before, after, config.level_set_floor)
        reason = merge_verdict(config, semantics, before, after, error)
    if reason is not None:
        rollback()
        deltas = [torch.zeros_like(d) for d in deltas]
    return Verdict(deltas, reason, after, error, fraction)


def merge_verdict(
    config: TeleportConfig, semantics: Semantics, before: torch.Tensor, after: torch.Tensor, error: float
) -> str | None:
    """Why a teleport measured after its merge is rolled back, or None: "non-finite" if the
    losses after it are not (error inf), "left the level set" if its level-set error is above
    ``config.level_set_tolerance``, else the guard's verdict where the guard is on."""
    if error == float("inf"):
        return "non-finite"
    if config.level_set_tolerance is not None and error > config.level_set_tolerance:
        return "left the level set"
    if config.guard_for(semantics):
        return guard_verdict(before, after, config.guard_tolerance)
    return None


def guard_verdict(before: torch.Tensor, after: torch.Tensor, tolerance: float) -> str | None:
    """Why the guard rolls back, or None: "non-finite" if anything after is NaN/inf, "loss rose"
    if some task's mean loss rose by more than ``tolerance``·|before| (relative to the size of
    the contour, so that a negative loss is judged the same way as a positive one)."""
    if not bool(torch.isfinite(after).all()):
        return "non-finite"
    rise = after.double() - before.double()
    if bool((rise > tolerance * before.double().abs() + 1e-12).any()):
        return "loss rose"
    return None
