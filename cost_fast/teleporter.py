"""The teleport's coordination inside COST: when a teleport may run, which one runs, how it is
reported, and HTR after it.

- Schedule: a teleport may run when the semantics' trigger fires, from ``start_step`` and
  ``start_epoch`` on, at most ``max_teleports_per_epoch`` times per epoch, and never in the middle
  of a gradient accumulation (it would move the parameters the earlier micro-batches were taken at).
- Which: the adapter teleport (``cost_fast.teleport``: LoRA or LoHa in weight space, trained on
  L_t and L_g, merged, guarded) or the rescaling teleport (``cost_fast.symmetry``), which gets the
  same measures: its level-set error, the guard's verdict (``merge_verdict``) and the refusal of
  a non-finite result, rolled back bit-exactly.
- HTR (``cost_fast.htr``): after a merged teleport, σ = cos(Δθ, g') arms the modulation of Adam's
  moments, where g' is the last base update (public semantics, kept here: ``record_update``) or
  the base method's direction at the pre-teleport point (paper semantics, Eq. 12), computed
  without advancing the method's state.

The caller's random generators are untouched: iterating a shuffled DataLoader as teleport data
draws from them, so they are restored.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cost_fast.aggregators.base import Aggregator
from cost_fast.backward import apply_method
from cost_fast.checks import all_finite
from cost_fast.grads import UpdateBuffer
from cost_fast.htr import HistoryReuse, flat_cosine
from cost_fast.kernels import GramStats
from cost_fast.lora import TeleportAdapter
from cost_fast.perturbed import LossFn
from cost_fast.rng import caller_generators_untouched
from cost_fast.semantics import Semantics
from cost_fast.step import StepInfo
from cost_fast.symmetry import RescalingTeleport
from cost_fast.teleport import TeleportConfig, eval_mode, level_set_error, loss_contour, merge_verdict, teleport
from cost_fast.weighting.base import LossWeighting


@dataclasses.dataclass(frozen=True)
class TeleportSchedule:
    """When COST may teleport: from step ``start_step`` and epoch ``start_epoch`` on, at most
    ``max_per_epoch`` times per epoch (0: never)."""

    start_step: int = 0
    start_epoch: int = 0
    max_per_epoch: int = 1

    def allows(self, step: int, epoch: int, teleports_this_epoch: int) -> bool:
        """A teleport may run at this step (the trigger aside)."""
        return step >= self.start_step and epoch >= self.start_epoch and teleports_this_epoch < self.max_per_epoch


class Teleporter:
    """Runs COST's teleports (module docstring) and keeps what they need between steps: the
    number of teleports this epoch and HTR's g'.

    Args:
        model: the whole model. adapter: the ``TeleportAdapter``, or None for ``symmetry``.
        symmetry: the ``RescalingTeleport``, or None.
        loss_fn: ``loss_fn(model, batch)``, this process's losses (the rescaling teleport's).
        global_loss_fn: the same over all ranks (the adapter teleport's).
        teleport_data: the re-iterable teleport batches. semantics, config: as in ``COST``.
        optimizer: whose first group's lr is the adapter's default lr.
        method: the base method (for g' in paper semantics). htr: ``HistoryReuse`` or None.
        generator: COST's own generator. sum_gradients: ``grads -> None`` summing the adapter's
            gradients over ranks, or None.
        schedule: the ``TeleportSchedule``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: TeleportAdapter | None,
        symmetry: RescalingTeleport | None,
        loss_fn: LossFn,
        global_loss_fn: LossFn,
        teleport_data: Iterable[Any],
        semantics: Semantics,
        config: TeleportConfig,
        optimizer: torch.optim.Optimizer,
        method: Aggregator | LossWeighting,
        htr: HistoryReuse | None,
        generator: torch.Generator,
        sum_gradients: Callable[[list[torch.Tensor | None]], None] | None,
        schedule: TeleportSchedule,
    ) -> None:
        self.model, self.adapter, self.symmetry = model, adapter, symmetry
        self.loss_fn, self.global_loss_fn, self.teleport_data = loss_fn, global_loss_fn, teleport_data
        self.semantics, self.config, self.optimizer = semantics, config, optimizer
        self.method, self.htr, self.generator, self.sum_gradients = method, htr, generator, sum_gradients
        self.schedule = schedule
        self.teleports_this_epoch = 0
        # HTR's g' in public semantics is the last base update: kept apart from the engine's
        # buffer, which a skipped step overwrites.
        self.keeps_last_update = (
            htr is not None and semantics.htr_direction == "last_update" and schedule.max_per_epoch > 0
        )
        self.last_update: torch.Tensor | None = None

    def allowed(self, step: int, epoch: int) -> bool:
        """The schedule lets a teleport run at this step (the trigger aside)."""
        return self.schedule.allows(step, epoch, self.teleports_this_epoch)

    def new_epoch(self) -> None:
        self.teleports_this_epoch = 0

    def record_update(self, update: torch.Tensor) -> None:
        """Keep the base update just taken (flat, (P,)) as HTR's g' when the semantics use it."""
        if not self.keeps_last_update:
            return
        if self.last_update is None:
            self.last_update = update.clone()
        else:
            self.last_update.copy_(update)

    def run(
        self,
        engine: UpdateBuffer,
        losses: torch.Tensor,
        stats: GramStats,
        scale: torch.Tensor | None,
        batch: Any,
        info: StepInfo,
    ) -> None:
        """Teleport at ``batch`` (global ``losses``, their ``stats``), report it in ``info``,
        then arm HTR."""
        with caller_generators_untouched(self.model):
            g_prime = self._htr_direction(engine, losses, stats, scale)
            if self.symmetry is not None:
                self._rescale(engine, batch, info, g_prime)
                return
            result = teleport(
                self.model,
                self.adapter,
                self.global_loss_fn,
                self.teleport_data,
                batch,
                ratios=self.semantics.ratio_weights(stats.norms),
                semantics=self.semantics,
                config=self.config,
                lr=self.optimizer.param_groups[0]["lr"],
                generator=self.generator,
                reduce_gradients=self.sum_gradients,
            )
        info.task_terms, info.sharpness_terms = result.task_terms, result.sharpness_terms
        info.level_set_error, info.merged_fraction = result.level_set_error, result.fraction
        self._report(
            engine, info, result.steps, result.rollback_reason, self.adapter.base_parameters, result.deltas, g_prime
        )

    def _htr_direction(
        self, engine: UpdateBuffer, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """g' of HTR as parameter-shaped tensors, or None (no HTR, or no base update yet)."""
        if self.htr is None:
            return None
        if self.semantics.htr_direction == "pre_teleport_gradient":
            saved = copy.deepcopy(self.method.state_dict())
            apply_method(self.method, losses.detach().requires_grad_(), engine, stats.gram, scale)
            self.method.load_state_dict(saved)
            return engine.combined_views
        if self.last_update is None:
            return None
        return _parameter_views(self.last_update, engine.params)

    def _rescale(self, engine: UpdateBuffer, batch: Any, info: StepInfo, g_prime: list[torch.Tensor] | None) -> None:
        """The rescaling teleport, with the same measures as the adapter teleport: its level-set
        error, the guard (the semantics' default, or the config's), ``level_set_tolerance`` as a
        check (a rescaling has no ΔW to shrink) and the refusal of a non-finite result."""
        config = self.config
        measure = config.evaluates_after(self.semantics)
        params = self.symmetry.parameters
        snapshot = [p.detach().clone() for p in params]
        with eval_mode(self.model):
            before = loss_contour(self.model, self.loss_fn, self.teleport_data) if measure else None
            result = self.symmetry.teleport(self.loss_fn, batch)
            finite = all_finite([*params, result.losses_after])
            after = loss_contour(self.model, self.loss_fn, self.teleport_data) if measure and finite else None
        reason = None if finite else "non-finite"
        if after is not None:
            info.level_set_error = level_set_error(before, after, config.level_set_floor)
            reason = merge_verdict(config, self.semantics, before, after, info.level_set_error)
        info.merged_fraction = 1.0
        deltas = result.deltas
        if reason is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, snapshot)
            deltas = [torch.zeros_like(d) for d in deltas]
        info.symmetry = {
            "before": result.conflicts_before,
            "after": result.conflicts_after,
            "objective": result.objective,
        }
        self._report(engine, info, result.steps, reason, params, deltas, g_prime)

    def _report(
        self,
        engine: UpdateBuffer,
        info: StepInfo,
        steps: int,
        reason: str | None,
        params: list[torch.Tensor],
        deltas: list[torch.Tensor],
        g_prime: list[torch.Tensor] | None,
    ) -> None:
        """Count and report the teleport, then HTR from σ = cos(Δθ, g')."""
        self.teleports_this_epoch += 1
        info.teleported = reason is None
        info.rolled_back = reason is not None
        info.rollback_reason = reason
        info.teleport_steps = steps
        if reason is not None or g_prime is None:
            return
        delta_of = {id(p): d for p, d in zip(params, deltas)}
        aligned = [delta_of[id(p)] for p in engine.params]
        sigma = float(flat_cosine(aligned, g_prime))
        info.sigma = sigma
        info.htr = self.htr.arm(max(-1.0, min(1.0, sigma)))


def _parameter_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter-shaped views of a flat (P,) vector laid out in ``params``' order."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views
