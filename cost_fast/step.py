"""COST's ordinary step: the base method's update when no teleport runs.

``BaseStep.update`` adds into ``.grad``, as ``loss.backward()`` does:

    backbone θ:  Gᵀw       (a Gram method: w = method.weights(M), M = G Gᵀ; a loss weighting:
                            w_i = ∂total/∂L_i; a gradient method: its own update d = aggregate(G))
    heads φ:     ∇_φ Σ_i w_i L_i   (``BaseStepConfig(head_gradients="per_task")``: ∇_φ Σ_i L_i)

with everything computed and checked before anything is added, so that a non-finite result
never spoils an accumulated gradient (``skip`` reports it, or raises with ``nonfinite="raise"``,
or hands NaN to a GradScaler). After the optimizer step a loss weighting learns from the step
(``after_optimizer_step``), and its epoch closes only after that learning.

``StepInfo`` is what one step saw and did; ``BaseStepConfig`` switches the step to the public
COST trainers' (unweighted heads, K·Gᵀw, gradient clipping).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.backward import add_into_grad, apply_method, gradients
from cost_fast.checks import all_finite
from cost_fast.grads import UpdateBuffer
from cost_fast.kernels import GramStats
from cost_fast.timing import PhaseTimer
from cost_fast.weighting.base import LossWeighting

NONFINITE = "non-finite losses or task gradients"
NONFINITE_UPDATE = "non-finite weights, update or head gradients"
# A gradient method's state (MoCo's, ExcessMTL's: K x P) is not snapshotted, so a non-finite
# update it makes from finite gradients leaves that state one step on.
NONFINITE_GRADIENT_METHOD_UPDATE = "non-finite update from the gradient method (its state has taken this step)"


@dataclasses.dataclass(frozen=True)
class BaseStepConfig:
    """How COST forms an ordinary step. The defaults give the base method's own step (what it
    does alone); ``public_code()`` gives the public COST trainers' step.

    Attributes:
        head_gradients: ``"weighted"`` (the heads get ∇ Σ w_i L_i, default) or ``"per_task"``
            (head i gets its unweighted ∇L_i, i.e. ∇ Σ L_i: the public code).
        scale_backbone_by_tasks: the backbone gets K·Gᵀw instead of Gᵀw (the public code).
        clip_grad_norm: clip the norm of all gradients to this before the optimizer step (the
            public code: 1.0); None (default): no clipping.
        step_after_teleport: also take a base step at the teleported point in the teleport's
            iteration (the public CityScapes trainer); default False (its NYUv2 trainer).
    """

    head_gradients: Literal["weighted", "per_task"] = "weighted"
    scale_backbone_by_tasks: bool = False
    clip_grad_norm: float | None = None
    step_after_teleport: bool = False

    def __post_init__(self) -> None:
        if self.head_gradients not in ("weighted", "per_task"):
            raise ValueError(f"head_gradients must be 'weighted' or 'per_task', got {self.head_gradients!r}")
        if self.clip_grad_norm is not None and not (
            isinstance(self.clip_grad_norm, int | float) and 0 < self.clip_grad_norm < float("inf")
        ):
            raise ValueError(f"clip_grad_norm must be a finite number > 0 or None, got {self.clip_grad_norm!r}")

    @classmethod
    def public_code(cls, *, step_after_teleport: bool = False) -> BaseStepConfig:
        """The public code's step: per-task heads, K·Gᵀw, gradients clipped to norm 1."""
        return cls("per_task", True, 1.0, step_after_teleport)


@dataclasses.dataclass
class StepInfo:
    """What one ``COST.step`` saw and did (host values).

    ``skipped`` says why a step changed nothing (non-finite values), else None. A teleport that
    the guard rolled back has ``rolled_back`` True and its ``rollback_reason``."""

    step: int
    epoch: int
    num_dominated: int
    num_conflicting_pairs: int
    min_cos_mean: float
    mean_norm: float  # ‖g0‖, the norm of the mean task gradient
    trigger: bool
    skipped: str | None = None
    teleported: bool = False
    stepped_after_teleport: bool = False
    rolled_back: bool = False
    rollback_reason: str | None = None
    sigma: float | None = None
    htr: str | None = None
    teleport_steps: int = 0
    # rescaling teleport: conflict statistics of the batch before and after, and J per step
    symmetry: dict[str, Any] | None = None
    task_terms: list[float] = dataclasses.field(default_factory=list)  # L_t per adapter step
    sharpness_terms: list[float] = dataclasses.field(default_factory=list)  # L_g per adapter step
    # max_i |L_i(after) - L*_i| / max(|L*_i|, floor) on the teleport data (cost_fast.teleport),
    # at the point merged (or last tried, if rolled back); None if not measured
    level_set_error: float | None = None
    merged_fraction: float | None = None  # t of W + t·ΔW (below 1 only with level_set_tolerance)
    task_names: tuple[str, ...] | None = None  # the keys of a dict of losses, in their order
    timer: PhaseTimer | None = dataclasses.field(default=None, repr=False)

    @property
    def seconds(self) -> dict[str, float]:
        """Time per phase (gradients, gram, solve, teleport, optimizer_step): device time on
        CUDA (reading it waits for the step's events), wall time elsewhere."""
        return {} if self.timer is None else self.timer.seconds()

    @property
    def attempted_teleport(self) -> bool:
        """A teleport ran (merged or rolled back)."""
        return self.teleported or self.rolled_back


class BaseStep:
    """The base method's update into ``.grad`` (module docstring), its refusal of non-finite
    values, and the loss weighting's learning after the optimizer step.

    Args:
        method: the base method (an ``Aggregator`` or a ``LossWeighting``).
        config: ``BaseStepConfig``.
        heads: the model's trainable parameters outside the backbone.
        shared: the backbone's trainable parameters (for ``clip_grad_norm``).
        sum_over_ranks: sums each rank's share of the heads' gradients in place (a no-op with
            one process).
        nonfinite: ``"skip"`` or ``"raise"``. scaler: a GradScaler, or None.
    """

    def __init__(
        self,
        method: Aggregator | LossWeighting,
        config: BaseStepConfig,
        *,
        heads: list[torch.Tensor],
        shared: list[torch.Tensor],
        sum_over_ranks: Callable[[list[torch.Tensor | None]], None],
        nonfinite: Literal["skip", "raise"],
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.method, self.config = method, config
        self.heads, self.shared = heads, shared
        self.learned = [p for p in method.parameters() if p.requires_grad] if isinstance(method, LossWeighting) else []
        self.sum_over_ranks = sum_over_ranks
        self.nonfinite, self.scaler = nonfinite, scaler
        self.wrote_gradients = False  # added to .grad since the last optimizer step
        self._pending_learning: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self._epoch_due = False  # the weighting's end_epoch() waits for its last learning

    def update(
        self, engine: UpdateBuffer, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None, batch: Any
    ) -> str | None:
        """Add the base update into ``.grad`` and return None; or add nothing and return why
        (``NONFINITE_UPDATE``: the weights, the update or the heads' gradients are not finite,
        the base method's state as it was; ``NONFINITE_GRADIENT_METHOD_UPDATE``: a gradient
        method's update is not finite). ``scale`` is a GradScaler's scale s (the gradients of
        s·L) or None. The update is left in ``engine.combined``."""
        heads, learned = self.heads, self.learned

        def scaled(total: torch.Tensor) -> torch.Tensor:
            return total if scale is None else total * scale.to(total)

        if isinstance(self.method, Aggregator) and self.method.kind == "grads":
            # The heads' gradient (of Σ L_i) does not depend on the method, so it is checked
            # first, and the method's state (MoCo's: K x P) advances only on a step that is taken.
            head_grads, learned_grads = gradients(scaled(losses.sum()), heads), []
            self.sum_over_ranks(head_grads)
            if not all_finite(head_grads):
                return NONFINITE_UPDATE
            apply_method(self.method, losses, engine, stats.gram, scale)
            if not all_finite([engine.combined]):
                return NONFINITE_GRADIENT_METHOD_UPDATE
        else:
            saved = copy.deepcopy(self.method.state_dict())  # small: K-sized buffers, generators
            total, _ = apply_method(self.method, losses, engine, stats.gram, scale)
            if self.config.head_gradients == "per_task":
                head_grads = gradients(scaled(losses.sum()), heads, retain_graph=bool(learned))
                learned_grads = gradients(scaled(total), learned)
            else:
                both = gradients(scaled(total), heads + learned)
                head_grads, learned_grads = both[: len(heads)], both[len(heads) :]
            self.sum_over_ranks(head_grads)
            if not all_finite([engine.combined, *head_grads, *learned_grads]):
                self.method.load_state_dict(saved)
                return NONFINITE_UPDATE
        if self.config.scale_backbone_by_tasks:
            engine.combined.mul_(engine.num_tasks)
        engine.write_update(engine.combined)
        add_into_grad(heads + learned, head_grads + learned_grads)
        self.wrote_gradients = True
        if isinstance(self.method, LossWeighting):
            self._pending_learning = (losses.detach(), stats.norms, batch)
        return None

    def skip(self, engine: UpdateBuffer, info: StepInfo, reason: str) -> StepInfo:
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
            engine.write_update(torch.full_like(engine.combined, float("nan")))
            self.wrote_gradients = True
            reason += " (handed to the GradScaler, which skips the optimizer step and lowers its scale)"
        info.skipped = reason
        return info

    # -- around the optimizer step -------------------------------------------------------------

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

    def after_optimizer_step(self, losses_after: Callable[[Any], torch.Tensor]) -> None:
        """The loss weighting learns from the step just taken (``LossWeighting.after_step``;
        ``losses_after(batch)``: the step's losses at the new parameters)."""
        self.wrote_gradients = False
        if self._pending_learning is None:
            return
        losses, norms, batch = self._pending_learning
        self._pending_learning = None
        self.method.after_step(losses, grad_norms=norms, losses_after=lambda: losses_after(batch))
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
