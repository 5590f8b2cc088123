"""The teleport's coordination inside COST: which teleport runs, how it is reported, and HTR after
it (when one may run is ``cost_fast.teleport.schedule``).

- Which: the adapter teleport (``cost_fast.teleport.adapter_teleport``: LoRA or LoHa in weight
  space, trained on L_t and L_g, merged) or the rescaling teleport
  (``cost_fast.teleport.rescaling``). Both are judged by the one verdict path
  (``cost_fast.teleport.verdict.settle``: the refusal of a non-finite result, the level-set
  error, the guard), and rolled back bit-exactly when refused.
- HTR (``cost_fast.teleport.htr``): after a merged teleport, σ = cos(Δθ, g') arms the
  modulation of Adam's moments, where g' is the last base update (public semantics, kept by
  ``HistoryReuse.record_update``) or the base method's direction at the pre-teleport point
  (paper semantics, Eq. 12), computed without advancing the method's state.

The teleporter owns COST's generator (the adapter's random factors, the teleport noise), which
is its state. The caller's random generators are untouched: iterating a shuffled DataLoader as
teleport data draws from them (torch's global ones, the loader's and its sampler's), so they are
restored; and the caller's iteration of that loader is never disturbed (``TeleportData``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cost_fast.checks import all_finite
from cost_fast.grads import GradientEngine
from cost_fast.info import StepInfo
from cost_fast.kernels import GramStats
from cost_fast.methods import Method
from cost_fast.rng import caller_generators_untouched
from cost_fast.teleport.adapter_teleport import teleport
from cost_fast.teleport.config import AdapterConfig, RescaleConfig, TeleportConfig
from cost_fast.teleport.contour import eval_mode, loss_contour
from cost_fast.teleport.data import TeleportData
from cost_fast.teleport.htr import HistoryReuse, flat_cosine
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.perturbed import LossFn
from cost_fast.teleport.rescaling import RescalingTeleport
from cost_fast.teleport.semantics import Semantics
from cost_fast.teleport.verdict import settle
from cost_fast.update import apply_method


class Teleporter:
    """Runs COST's teleports (module docstring).

    Args:
        model: the whole model. shared: its shared backbone.
        adapter: ``AdapterConfig`` (the LoRA/LoHa adapter, built here on ``shared``) or
            ``RescaleConfig`` (the rescaling teleport).
        loss_fn: ``loss_fn(model, batch)``, this process's losses (the rescaling teleport's).
        global_loss_fn: the same over all ranks (the adapter teleport's).
        teleport_data: the teleport batches (``TeleportData``). semantics, config: as in ``COST``.
        optimizer: whose first group's lr is the adapter's default lr.
        method: the base method (for g' in paper semantics). htr: ``HistoryReuse`` or None.
        seed: the seed of the teleporter's generator, the same on every rank.
        sum_over_ranks: sums the adapter's gradients over ranks in place (None: one process).
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module,
        *,
        adapter: AdapterConfig | RescaleConfig,
        loss_fn: LossFn,
        global_loss_fn: LossFn,
        teleport_data: TeleportData,
        semantics: Semantics,
        config: TeleportConfig,
        optimizer: torch.optim.Optimizer,
        method: Method,
        htr: HistoryReuse | None,
        seed: int,
        sum_over_ranks: Callable[[list[torch.Tensor | None]], None] | None,
    ) -> None:
        device = next(p for p in shared.parameters() if p.requires_grad).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.model, self.adapter_config = model, adapter
        if isinstance(adapter, RescaleConfig):
            self.adapter, self.rescaling = None, RescalingTeleport(model, shared, adapter)
        else:
            semantics.check_model(model)  # before any step, not at the first teleport
            self.adapter = TeleportAdapter(
                shared, rank=adapter.rank, method=adapter.method, generator=self.generator, targets=adapter.targets
            )
            self.rescaling = None
        self.loss_fn, self.global_loss_fn, self.teleport_data = loss_fn, global_loss_fn, teleport_data
        self.semantics, self.config, self.optimizer = semantics, config, optimizer
        self.method, self.htr, self.sum_over_ranks = method, htr, sum_over_ranks

    def describe(self) -> str:
        """The adapter, for the ranks' agreement check."""
        if self.adapter is None:
            return f"rescale {self.adapter_config}"
        return f"{self.adapter.method} rank {self.adapter.rank} on {self.adapter.names}"

    def run(
        self,
        engine: GradientEngine,
        losses: torch.Tensor,
        stats: GramStats,
        scale: torch.Tensor | None,
        batch: Any,
        info: StepInfo,
    ) -> None:
        """Teleport at ``batch`` (global ``losses``, their ``stats``), report it in ``info``,
        then arm HTR."""
        with caller_generators_untouched(self.model, self.teleport_data.generators()):
            g_prime = self._htr_direction(engine, losses, stats, scale)
            if self.rescaling is not None:
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
                sum_over_ranks=self.sum_over_ranks,
            )
        info.task_terms, info.sharpness_terms = result.task_terms, result.sharpness_terms
        info.level_set_error, info.merged_fraction = result.level_set_error, result.fraction
        self._report(
            engine, info, result.steps, result.rollback_reason, self.adapter.base_parameters, result.deltas, g_prime
        )

    def _htr_direction(
        self, engine: GradientEngine, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """g' of HTR as parameter-shaped tensors, or None (no HTR, or no base update yet)."""
        if self.htr is None:
            return None
        if self.semantics.htr_direction == "pre_teleport_gradient":
            saved = copy.deepcopy(self.method.state_dict())
            apply_method(self.method, losses.detach().requires_grad_(), engine, stats.gram, scale)
            self.method.load_state_dict(saved)
            return engine.combined_views
        if self.htr.last_update is None:
            return None
        return _parameter_views(self.htr.last_update, engine.params)

    def _rescale(self, engine: GradientEngine, batch: Any, info: StepInfo, g_prime: list[torch.Tensor] | None) -> None:
        """The rescaling teleport, judged as the adapter teleport is (``settle``); a rescaling
        has no ΔW to shrink, so ``level_set_tolerance`` is a check only."""
        config, semantics = self.config, self.semantics
        params = self.rescaling.parameters
        snapshot = [p.detach().clone() for p in params]

        def rollback() -> None:
            with torch.no_grad():
                torch._foreach_copy_(params, snapshot)

        with eval_mode(self.model):
            before = (
                loss_contour(self.model, self.loss_fn, self.teleport_data)
                if config.evaluates_after(semantics)
                else None
            )
            result = self.rescaling.teleport(self.loss_fn, batch)
            verdict = settle(
                config,
                semantics,
                before=before,
                move=lambda fraction: result.deltas,  # the group action has moved the backbone
                finite=lambda deltas: all_finite([*params, result.losses_after]),
                measure=lambda: loss_contour(self.model, self.loss_fn, self.teleport_data),
                rollback=rollback,
                shrinkable=False,
            )
        info.level_set_error, info.merged_fraction = verdict.error, verdict.fraction
        info.symmetry = {
            "before": result.conflicts_before,
            "after": result.conflicts_after,
            "objective": result.objective,
        }
        self._report(engine, info, result.steps, verdict.reason, params, verdict.deltas, g_prime)

    def _report(
        self,
        engine: GradientEngine,
        info: StepInfo,
        steps: int,
        reason: str | None,
        params: list[torch.Tensor],
        deltas: list[torch.Tensor],
        g_prime: list[torch.Tensor] | None,
    ) -> None:
        """Report the teleport, then HTR from σ = cos(Δθ, g')."""
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

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """{"generator": the teleporter's generator state}."""
        return {"generator": self.generator.get_state()}

    def state_problems(self, state: Any) -> list[str]:
        """What in ``state`` does not fit ([] if it fits); nothing is changed."""
        if not isinstance(state, dict) or set(state) != {"generator"}:
            return [f"a teleporter state that is not {{'generator': ...}}: {type(state).__name__}"]
        value = state["generator"]
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
            return [f"a generator state that is not a uint8 tensor ({type(value).__name__})"]
        trial = torch.Generator(device=self.generator.device)
        try:
            trial.set_state(value)
        except (RuntimeError, ValueError) as err:
            return [f"a generator state that a {self.generator.device} generator refuses ({err})"]
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.generator.set_state(state["generator"])


def _parameter_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter-shaped views of a flat (P,) vector laid out in ``params``' order."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views
