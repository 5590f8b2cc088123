"""COST's teleport: train the LoRA adapter to a loss-equivalent, sharper point, merge, check.

    L*_i   = mean over the teleport data of L_i(θ)                      (before any adapter step)
    L_t    = (1/K) Σ_i |L_i(θ+Δθ; b) - L*_i|                            (teleport batch b)
    L_lora = a L_t - b L_g,   minimized by Adam over the adapter, ``rounds`` passes over the data

with L_g, a and b given by the semantics (``cost_fast.semantics``: "public" or "paper"). Then
the adapter is merged into the backbone (Δθ) and reset.

The guard (on by default in paper semantics, off in public semantics as in the public code;
``TeleportConfig(guard=...)`` overrides) evaluates the teleport data once more after the merge
and rolls the backbone back bit-exactly if any task's mean loss rose by more than
``guard_tolerance`` of its size,

    L_i(θ+Δθ) - L*_i > tol · |L*_i|     (right for losses of any sign),

or if anything is non-finite. ``guard=False`` keeps a teleport that raised a loss, as the public
code does.

The level-set error of a teleport is what it did to the losses it was meant to keep,

    e = max_i |L_i(θ+Δθ) - L*_i| / max(|L*_i|, floor)      (means over the teleport data),

measured by that same pass after the merge (``TeleportConfig(measure_level_set=True)``, the
default: one forward pass per teleport batch without grad, shared with the guard's) and reported
in ``TeleportResult``/``StepInfo``. ``TeleportConfig(level_set_tolerance=tol)`` makes the teleport
loss-preserving: while e > tol it merges half as much of the trained ΔW (W + t·ΔW, t = 1, 1/2, …,
``level_set_halvings`` times, one pass each), and rolls back ("left the level set") if no t
qualifies. Off by default, so the public code's teleport stays as it is.

Guard or no guard, a teleport whose adapter steps (L_t, L_g), contour L*, merged update ΔW or
measured losses after the merge are not finite (a NaN in the teleport data, an adapter learning
rate that diverges) is never merged: the backbone is put back bit-exactly and the teleport is reported as rolled back,
"non-finite". That check reads values the teleport computes anyway (no extra pass).

The adapter lives in weight space (``TeleportAdapter``): per adapter step its update ΔW is formed
once, and every forward pass of the step, with grad or without, is a plain forward pass of the
model at W + ΔW (``EffectivePoint``). The model is in eval mode (as in the public code) and every
module goes back to the mode it had.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cost_fast.checks import all_finite, check_int
from cost_fast.lora import TeleportAdapter
from cost_fast.perturbed import EffectivePoint, LossFn
from cost_fast.semantics import Semantics, get_semantics


@dataclasses.dataclass(frozen=True)
class TeleportConfig:
    """Settings of a teleport that do not depend on the semantics (frozen: use
    ``dataclasses.replace`` to change one).

    Attributes:
        lr: Adam learning rate of the adapter (default None: the lr of the training
            optimizer's first group, as the public code uses the model's).
        rounds: passes over the teleport data (``tele_round``, default 2).
        max_steps: optional budget of adapter steps (stops the passes early).
        num_samples: n perturbations per step for L_g (default 5).
        guard: evaluate the teleport data after the merge and roll back on a rise (default
            None: the semantics' ``default_guard``, off in public semantics, on in paper).
        guard_tolerance: the rise, relative to |L*_i|, that rolls back (default 0.05).
        samples_per_pass: perturbed samples evaluated together in one vmapped forward pass
            (default 1: one pass per sample, in place). Larger values cost that many copies of
            the perturbed parameters; a loss that ``vmap`` cannot trace falls back to 1.
        measure_level_set: evaluate the teleport data after the merge to report the level-set
            error (module docstring; default True). False skips that pass when nothing else
            needs it (the guard and ``level_set_tolerance`` do), as the public code does.
        level_set_tolerance: None (default) merges the trained ΔW whole; a number makes the
            teleport loss-preserving: the largest t in 1, 1/2, … with level-set error ≤ it.
        level_set_floor: the floor of the error's denominator (default 1e-3), so that a loss
            near zero is judged by absolute change.
        level_set_halvings: how many times t is halved before a rollback (default 5: t ≥ 1/32).
    """

    lr: float | None = None
    rounds: int = 2
    max_steps: int | None = None
    num_samples: int = 5
    guard: bool | None = None
    guard_tolerance: float = 0.05
    samples_per_pass: int = 1
    measure_level_set: bool = True
    level_set_tolerance: float | None = None
    level_set_floor: float = 1e-3
    level_set_halvings: int = 5

    def __post_init__(self) -> None:
        if self.lr is not None and not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0 or None, got {self.lr!r}")
        for name in ("rounds", "num_samples", "samples_per_pass"):
            check_int(name, getattr(self, name), 1)
        check_int("max_steps", self.max_steps, 1, optional=True)
        if self.guard is not None and not isinstance(self.guard, bool):
            raise ValueError(f"guard must be True, False or None, got {self.guard!r}")
        if not (isinstance(self.guard_tolerance, int | float) and self.guard_tolerance >= 0):
            raise ValueError(f"guard_tolerance must be ≥ 0, got {self.guard_tolerance!r}")
        if not isinstance(self.measure_level_set, bool):
            raise ValueError(f"measure_level_set must be True or False, got {self.measure_level_set!r}")
        tolerance = self.level_set_tolerance
        if tolerance is not None and not (
            isinstance(tolerance, int | float) and not isinstance(tolerance, bool) and 0 <= tolerance < float("inf")
        ):
            raise ValueError(f"level_set_tolerance must be a finite number ≥ 0 or None, got {tolerance!r}")
        if not (isinstance(self.level_set_floor, int | float) and 0 < self.level_set_floor < float("inf")):
            raise ValueError(f"level_set_floor must be a finite number > 0, got {self.level_set_floor!r}")
        check_int("level_set_halvings", self.level_set_halvings, 0)

    def guard_for(self, semantics: Semantics) -> bool:
        """Whether the guard runs: ``guard`` when set, else the semantics' ``default_guard``."""
        return self.guard if self.guard is not None else semantics.default_guard

    def evaluates_after(self, semantics: Semantics) -> bool:
        """Whether the teleport data is evaluated after the merge (level-set error, guard or
        loss-preserving teleport)."""
        return self.measure_level_set or self.guard_for(semantics) or self.level_set_tolerance is not None


@dataclasses.dataclass
class TeleportResult:
    """What a teleport did. ``deltas`` is Δθ aligned with the adapter's base parameters
    (all zeros after a rollback); ``task_terms``/``sharpness_terms`` are L_t and L_g per step;
    ``contour_before``/``contour_after`` the mean task losses over the teleport data at the start
    and at the point merged (or last tried, after a rollback); ``level_set_error`` the error at
    that point (module docstring); ``fraction`` the share t of the trained ΔW merged;
    ``rollback_reason`` says why it was rolled back ("loss rose", "non-finite", "left the level
    set"), else None."""

    deltas: list[torch.Tensor]
    steps: int
    task_terms: list[float]
    sharpness_terms: list[float]
    contour_before: torch.Tensor
    contour_after: torch.Tensor | None  # None when nothing evaluated the data after the merge
    rollback_reason: str | None
    level_set_error: float | None = None  # None when contour_after is None
    fraction: float = 1.0

    @property
    def rolled_back(self) -> bool:
        """True when the guard put the backbone back where it was."""
        return self.rollback_reason is not None


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


def teleport(
    model: nn.Module,
    adapter: TeleportAdapter,
    loss_fn: LossFn,
    data: Iterable[Any],
    current_batch: Any,
    *,
    ratios: torch.Tensor,
    semantics: str | Semantics,
    config: TeleportConfig,
    lr: float | None = None,
    generator: torch.Generator | None = None,
    reset: bool = True,
    progress: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    reduce_gradients: Callable[[list[torch.Tensor | None]], None] | None = None,
) -> TeleportResult:
    """One COST teleport of ``model``'s shared backbone (module docstring).

    Args:
        model: the whole multi-task model (``loss_fn(model, batch)`` gives its K losses).
        adapter: the ``TeleportAdapter`` built on the shared backbone; its scale is set from
            the semantics (``lora_alpha / rank``).
        data: the teleport data, iterated 1 + ``config.rounds`` times, +1 to measure the
            level-set error (``config.evaluates_after``), +1 per halving of t.
        current_batch: the training batch on which L_g is measured.
        ratios: R (shape (K,)), ``semantics.ratio_weights(norms)`` (keyword-only: the yardstick
            takes the gradient norms in its place).
        semantics: ``"public"``, ``"paper"`` or a ``Semantics``: L_g, the objective's weights
            and the adapter's alpha.
        config: the ``TeleportConfig``.
        lr: the adapter's learning rate when ``config.lr`` is None.
        generator: the source of the perturbation noise (reproducible runs).
        reset: start from freshly drawn adapter factors (default); False keeps the factors the
            adapter holds (e.g. set by the caller to compare with another implementation).
        progress: called as progress(step, L_t, L_g) after every adapter step (0-d device
            tensors: reading them synchronizes, so a progress bar should do it sparingly).
        reduce_gradients: called with the adapter's gradients before each adapter step (data
            parallel: their sum over the ranks, ``cost_fast.distributed``).

    Draws, in this order, from ``generator``: the adapter's random factors (``adapter.reset``,
    which uses the adapter's generator: COST gives both the same one; nothing with
    ``reset=False``), then the semantics' noise. Returns a ``TeleportResult``.
    """
    semantics = get_semantics(semantics)
    if not isinstance(config, TeleportConfig):
        raise TypeError(f"config must be a TeleportConfig, got {type(config).__name__}")
    if not isinstance(adapter, TeleportAdapter):
        raise TypeError(f"adapter must be a TeleportAdapter, got {type(adapter).__name__}")
    if not isinstance(ratios, torch.Tensor) or ratios.ndim != 1:
        got = f"shape {tuple(ratios.shape)}" if isinstance(ratios, torch.Tensor) else type(ratios).__name__
        raise ValueError(f"ratios must be the 1-D tensor R of the K ratio weights, got {got}")
    if iter(data) is data:
        raise ValueError("the teleport data must be re-iterable (a DataLoader or a list), not a one-shot iterator")
    adapter_lr = config.lr if config.lr is not None else lr
    if adapter_lr is None:
        raise ValueError("the adapter's learning rate is unknown: set TeleportConfig(lr=...) or pass lr")
    snapshot = adapter.snapshot()
    with eval_mode(model):
        try:
            contour = loss_contour(model, loss_fn, data)  # the identity adapter would change nothing
            adapter.set_alpha(semantics.lora_alpha)
            if reset:
                adapter.reset()
            name_of = {id(p): name for name, p in model.named_parameters()}
            probe = semantics.sharpness_probe(
                model,
                loss_fn,
                current_batch,
                ratios,
                model_parameters=list(model.named_parameters()),
                shared_parameters=[(name_of[id(p)], p) for p in adapter.base_parameters],
                generator=generator,
                samples_per_pass=config.samples_per_pass,
                num_samples=config.num_samples,
            )
            weight_names = [name_of[id(w)] for w in adapter.adapted_weights]
            optimizer = torch.optim.Adam(adapter.adapter_parameters, lr=adapter_lr)
            task_terms: list[torch.Tensor] = []
            sharp_terms: list[torch.Tensor] = []
            steps = 0
            budget = config.max_steps if config.max_steps is not None else float("inf")
            for _ in range(config.rounds):
                for batch in data:
                    deltas = adapter.deltas()  # once per step: every forward below is a plain one
                    point = EffectivePoint(
                        model,
                        loss_fn,
                        dict(zip(weight_names, [w + d for w, d in zip(adapter.adapted_weights, deltas)])),
                        lambda deltas=deltas: adapter.applied(deltas),
                    )
                    # The probe's no-grad passes write W + ΔW (+ ε) into the weights in place and
                    # put them back before any forward pass with grad of this step runs.
                    sharp_term = probe(steps, point)
                    losses = point.losses(batch)
                    task_term = (losses - contour.to(losses)).abs().mean()
                    objective = semantics.task_weight * task_term - semantics.sharpness_weight * sharp_term
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward(inputs=adapter.adapter_parameters)
                    if reduce_gradients is not None:
                        reduce_gradients([p.grad for p in adapter.adapter_parameters])
                    optimizer.step()
                    steps += 1
                    task_terms.append(task_term.detach())
                    sharp_terms.append(sharp_term.detach())
                    if progress is not None:
                        progress(steps, task_terms[-1], sharp_terms[-1])
                    if steps >= budget:
                        break
                if steps >= budget:
                    break
            deltas = adapter.merge()
            # L*, every step's L_t and L_g, ΔW and the merged weights: one host read
            finite = all_finite([contour, *task_terms, *sharp_terms, *deltas, *adapter.adapted_weights])
            after, reason, error, fraction = None, None, None, 1.0
            if not finite:
                reason = "non-finite"
            elif config.evaluates_after(semantics):
                after = loss_contour(model, loss_fn, data)
                error = level_set_error(contour, after, config.level_set_floor)
                tolerance = config.level_set_tolerance
                if tolerance is not None:
                    halvings = 0
                    while error > tolerance and halvings < config.level_set_halvings:
                        halvings += 1
                        fraction = 0.5**halvings
                        adapter.restore(snapshot)
                        deltas = adapter.merge(fraction)
                        after = loss_contour(model, loss_fn, data)
                        error = level_set_error(contour, after, config.level_set_floor)
                reason = merge_verdict(config, semantics, contour, after, error)
            if reason is not None:
                adapter.restore(snapshot)
                deltas = [torch.zeros_like(d) for d in deltas]
            # one host transfer for the whole history (nothing synchronizes inside the loop)
            history = torch.stack(task_terms + sharp_terms).tolist() if steps else []
            return TeleportResult(
                deltas, steps, history[:steps], history[steps:], contour, after, reason, error, fraction
            )
        except BaseException:
            adapter.restore(snapshot)
            raise


# Names of the first release, now methods of the semantics (``cost_fast.semantics``).
_RENAMED = {
    "reference_ratio_weights": "PublicSemantics().ratio_weights",
    "paper_ratio_weights": "PaperSemantics().ratio_weights",
}


def __getattr__(name: str) -> Any:
    """A removed name raises an ``ImportError`` naming its replacement (an ``AttributeError``
    would reach ``from cost_fast.teleport import ...`` as a bare "cannot import name")."""
    if name in _RENAMED:
        raise ImportError(f"cost_fast.teleport.{name} was removed: use cost_fast.semantics' {_RENAMED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
