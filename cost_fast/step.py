"""COST's ordinary step: the base method's update when no teleport runs, and what happens around
the optimizer step.

``BaseStep.update`` adds the base update into ``.grad`` as ``loss.backward()`` does, through
``cost_fast.update.base_update`` (the same update ``mtl_backward`` makes):

    backbone θ:  Gᵀw       (a Gram method: w = method.weights(M), M = G Gᵀ; a loss weighting:
                            w_i = ∂total/∂L_i; a gradient method: its own update d = aggregate(G))
    heads φ:     ∇_φ Σ_i w_i L_i   (``BaseStepConfig(head_gradients="per_task")``: ∇_φ Σ_i L_i)

with everything computed and checked before anything is added, so that a non-finite result
never spoils an accumulated gradient (``skip`` reports it, or raises with ``nonfinite="raise"``,
or hands NaN to a GradScaler). Around the optimizer step (hooks on the optimizer, whoever steps
it; ``close`` removes them): before it, the public code's clipping of the shared parameters'
gradient; after it, a loss weighting learns from the step, and its epoch closes only after that
learning. The base method's state is this part's state (``state_dict``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from cost_fast.grads import GradientEngine
from cost_fast.info import StepInfo
from cost_fast.kernels import GramStats
from cost_fast.methods import Method
from cost_fast.update import NONFINITE_GRADIENT_METHOD_UPDATE, BaseUpdate, base_update, hand_to_scaler
from cost_fast.weighting.base import LossWeighting

GRADIENT_MODES = ("loop", "batched", "representation")


@dataclasses.dataclass(frozen=True)
class BaseStepConfig:
    """How COST forms an ordinary step. The defaults give the base method's own step (what it
    does alone); ``public_code()`` gives the public COST trainers' step.

    Attributes:
        head_gradients: ``"weighted"`` (the heads get ∇ Σ w_i L_i, default) or ``"per_task"``
            (head i gets its unweighted ∇L_i, i.e. ∇ Σ L_i: the public code).
        scale_backbone_by_tasks: the backbone gets K·Gᵀw instead of Gᵀw (the public code).
        clip_grad_norm: clip the norm of the shared parameters' gradient to this before the
            optimizer step (the public code: 1.0; the heads' gradients are not clipped); None
            (default): no clipping.
        step_after_teleport: also take a base step at the teleported point in the teleport's
            iteration (the public CityScapes trainer); default False (its NYUv2 trainer).
        gradient_mode: ``"loop"`` (default) or ``"batched"`` (``TaskGradients``: exact per-task
            gradients of the shared parameters), or ``"representation"``
            (``RepresentationGradients``: per-task gradients of the backbone's output, weights
            from their Gram matrix; an approximation, much cheaper at large K).
        split_at_output: the exact modes split each task's backward pass at the backbone's
            output (``cost_fast.split_grads``: the heads' backward once for all tasks, then K
            passes through the backbone; the same G, checked at the first step); default True.
            False: each task's pass walks the whole graph. Not split across ranks.
        nonfinite: ``"skip"`` (default: a step with non-finite losses or gradients changes
            nothing and says so in ``StepInfo.skipped``) or ``"raise"`` (``FloatingPointError``).
    """

    head_gradients: Literal["weighted", "per_task"] = "weighted"
    scale_backbone_by_tasks: bool = False
    clip_grad_norm: float | None = None
    step_after_teleport: bool = False
    gradient_mode: Literal["loop", "batched", "representation"] = "loop"
    nonfinite: Literal["skip", "raise"] = "skip"
    split_at_output: bool = True

    def __post_init__(self) -> None:
        if self.head_gradients not in ("weighted", "per_task"):
            raise ValueError(f"head_gradients must be 'weighted' or 'per_task', got {self.head_gradients!r}")
        for name in ("scale_backbone_by_tasks", "step_after_teleport", "split_at_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, int | float)
            and not isinstance(self.clip_grad_norm, bool)
            and 0 < self.clip_grad_norm < float("inf")
        ):
            raise ValueError(f"clip_grad_norm must be a finite number > 0 or None, got {self.clip_grad_norm!r}")
        if self.gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"gradient_mode must be 'loop', 'batched' or 'representation', got {self.gradient_mode!r}")
        if self.nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {self.nonfinite!r}")

    @classmethod
    def public_code(cls, *, step_after_teleport: bool = False) -> BaseStepConfig:
        """The public code's step: per-task heads, K·Gᵀw, shared gradients clipped to norm 1."""
        return cls("per_task", True, 1.0, step_after_teleport)


class BaseStep:
    """The base method's update into ``.grad`` (module docstring), its refusal of non-finite
    values, and what happens around the optimizer step.

    Args:
        method: the base method (an ``Aggregator`` or a ``LossWeighting``).
        config: ``BaseStepConfig``.
        model: the whole model; ``loss_fn(model, batch)`` gives the (global) losses a loss
            weighting learns from after a step.
        heads: the model's trainable parameters outside the backbone.
        shared: the backbone's trainable parameters (for ``clip_grad_norm``).
        sum_over_ranks: sums each rank's share of the heads' gradients in place (a no-op with
            one process).
        scaler: a GradScaler, or None.
    """

    def __init__(
        self,
        method: Method,
        config: BaseStepConfig,
        *,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        heads: list[torch.Tensor],
        shared: list[torch.Tensor],
        sum_over_ranks: Callable[[list[torch.Tensor | None]], None],
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.method, self.config = method, config
        self.model, self.loss_fn = model, loss_fn
        self.heads, self.shared = heads, shared
        self.learned = [p for p in method.parameters() if p.requires_grad] if isinstance(method, LossWeighting) else []
        self.sum_over_ranks, self.scaler = sum_over_ranks, scaler
        self.wrote_gradients = False  # added to .grad since the last optimizer step
        self._pending_learning: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self._epoch_due = False  # the weighting's end_epoch() waits for its last learning
        self.hooks: list[Any] = []

    @property
    def nonfinite(self) -> str:
        return self.config.nonfinite

    def update(
        self,
        engine: GradientEngine,
        losses: torch.Tensor,
        stats: GramStats,
        scale: torch.Tensor | None,
        batch: Any,
        host_gram: torch.Tensor | None = None,
        host_losses: torch.Tensor | None = None,
    ) -> BaseUpdate | str:
        """Add the base update into ``.grad`` and return it (its weights); or add nothing and
        return why (``cost_fast.update``: the weights, the update or the heads' gradients are not
        finite). ``scale`` is a GradScaler's scale s (the gradients of s·L) or None;
        ``host_gram``, ``host_losses``: M and the losses on the host where the step's decision
        read brought them. The update is left in ``engine.combined``."""
        update = base_update(
            self.method,
            losses,
            engine,
            stats.gram,
            scale,
            heads=self.heads,
            head_gradients=self.config.head_gradients,
            scale_backbone_by_tasks=self.config.scale_backbone_by_tasks,
            sum_over_ranks=self.sum_over_ranks,
            host_gram=host_gram,
            known_losses=host_losses,
        )
        if isinstance(update, str):
            return update
        update.write()
        self.wrote_gradients = True
        if isinstance(self.method, LossWeighting):
            self._pending_learning = (losses.detach(), stats.norms, batch)
        return update

    def skip(self, engine: GradientEngine, info: StepInfo, reason: str) -> StepInfo:
        """A step that adds nothing to ``.grad`` (with a scaler: adds NaN, for the scaler to skip
        the optimizer step and lower its scale, as it would after a plain backward); with
        ``nonfinite="raise"``, ``FloatingPointError``."""
        if self.nonfinite == "raise":
            if reason == NONFINITE_GRADIENT_METHOD_UPDATE:
                unchanged = "the parameters and the optimizer were not changed"
            else:
                unchanged = "nothing was changed"
            raise FloatingPointError(f"step {info.step}: {reason}; {unchanged}")
        if self.scaler is not None and self.scaler.is_enabled():
            hand_to_scaler(engine)
            self.wrote_gradients = True
            reason += " (handed to the GradScaler, which skips the optimizer step and lowers its scale)"
        info.skipped = reason
        return info

    # -- around the optimizer step -------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the hooks around ``optimizer``'s step (``close`` removes them)."""
        self.hooks = [
            optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step()),
            optimizer.register_step_post_hook(lambda *_: self.after_optimizer_step()),
        ]

    def close(self) -> None:
        """Remove the optimizer hooks."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def begin(self) -> None:
        """At the start of a backward: a weighting's epoch that waited for an optimizer step
        which never came closes now, and no earlier step is left to learn from."""
        if self._epoch_due:
            self._close_epoch()
        self._pending_learning = None

    def before_optimizer_step(self) -> None:
        """``BaseStepConfig.clip_grad_norm`` on the shared parameters' gradient, as the public
        code's ``clip_grad_norm_(shared, 1.0)`` (after a GradScaler has unscaled it)."""
        clip = self.config.clip_grad_norm
        if clip is not None and self.wrote_gradients:
            torch.nn.utils.clip_grad_norm_([p for p in self.shared if p.grad is not None], clip)

    def after_optimizer_step(self) -> None:
        """The loss weighting learns from the step just taken (``LossWeighting.after_step``,
        with the step's losses at the new parameters)."""
        self.wrote_gradients = False
        if self._pending_learning is None:
            return
        losses, norms, batch = self._pending_learning
        self._pending_learning = None

        def losses_after() -> torch.Tensor:
            with torch.no_grad():
                return self.loss_fn(self.model, batch)

        self.method.after_step(losses, grad_norms=norms, losses_after=losses_after)
        if self._epoch_due:
            self._close_epoch()

    def new_epoch(self) -> None:
        """The weighting's ``end_epoch()``, after it has learned from the epoch's last step."""
        self._epoch_due = True
        if self._pending_learning is None:
            self._close_epoch()

    def _close_epoch(self) -> None:
        self._epoch_due = False
        if isinstance(self.method, LossWeighting):
            self.method.end_epoch()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base method's state (a copy)."""
        return copy.deepcopy(self.method.state_dict())

    def state_problems(self, state: Any) -> list[str]:
        """What in ``state`` the base method refuses (tried on a copy of it); [] if it fits."""
        trial = copy.deepcopy(self.method)
        try:
            trial.load_state_dict(copy.deepcopy(state))
        except Exception as err:  # noqa: BLE001 - any refusal of the method's own loader is reported
            return [f"a base-method state that {type(self.method).__name__} refuses ({type(err).__name__}: {err})"]
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (checked by ``state_problems`` first)."""
        self.method.load_state_dict(state)
