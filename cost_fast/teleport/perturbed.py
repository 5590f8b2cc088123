"""Task losses at perturbed parameters, without autograd and without copying the model.

Both COST semantics measure sharpness from the task losses at n points θ + ε_j. Here those
points are evaluated in one of two ways, with the same result:

- one sample per forward pass (``in_place_losses``): ε_j is added to the parameters in place
  by multi-tensor ops and the saved values (one flat copy) are copied back, so the parameters
  end bit-exactly where they started (also on error);
- s samples per pass (``batched_losses``): ``torch.func.vmap`` over s stacked perturbed copies
  of the perturbed parameters (not of the model: s times their memory, freed after the pass),
  which turns s small launches of every layer into one batched one.

``sample_losses`` (noise given per sample as a list of tensors) and ``flat_sample_losses``
(the noise of all n samples as one (n, P) tensor, ``cost_fast.kernels.tensorwise_noise``)
choose between them and fall back to one per pass, with a warning, for a loss that ``vmap``
cannot trace. ``losses_at`` evaluates the losses out of place at substituted parameters,
differentiably; ``EffectivePoint`` is the model at an adapter step's effective weights W + ΔW,
both ways: differentiably (``losses``, ``stacked_losses``; ``PairedLosses`` chooses) and in
place for no-grad passes (``applied``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def batched_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    named: list[tuple[str, torch.Tensor]],
    noise: list[list[torch.Tensor]],
) -> torch.Tensor:
    """(s, K) task losses at the s points θ + ε_j (``noise[j]`` aligned with ``named``) in one
    ``vmap``-ed forward pass, without grad; the model is untouched."""
    stacked = {name: p.detach() + torch.stack([eps[k] for eps in noise]) for k, (name, p) in enumerate(named)}
    return stacked_point_losses(model, loss_fn, batch, stacked)


def stacked_point_losses(
    model: nn.Module, loss_fn: LossFn, batch: Any, stacked: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(s, K) task losses at s points, each parameter named in ``stacked`` given as its s values
    stacked along dim 0, in one ``vmap``-ed forward pass without grad; the model is untouched."""
    with torch.no_grad():
        return torch.func.vmap(lambda subs: losses_at(model, loss_fn, batch, subs), randomness="different")(stacked)


def sample_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    named: list[tuple[str, torch.Tensor]],
    draws: list[Callable[[], list[torch.Tensor]]],
    samples_per_pass: int,
) -> torch.Tensor:
    """(n, K) task losses at θ + ε_j for the n noise draws ``draws[j]()`` (each a list aligned
    with ``named``), without grad, ``samples_per_pass`` samples per forward pass.

    One per pass: ε_j is added in place and the saved values copied back, so the parameters
    end bit-exactly where they started. More: ``batched_losses``; if ``vmap`` cannot run the
    loss (e.g. it calls ``.item()``), a warning is given and the remaining samples run one per
    pass. Draws are made in order either way, so the noise is the same.
    """
    params = [p for _, p in named]
    rows: list[torch.Tensor] = []
    j = 0
    while samples_per_pass > 1 and j < len(draws):
        chunk = [draw() for draw in draws[j : j + samples_per_pass]]
        j += len(chunk)
        try:
            rows.append(batched_losses(model, loss_fn, batch, named, chunk))
        except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to the plain loop
            _warn_unbatchable(err)
            adds = [lambda e=e: torch._foreach_add_(params, e) for e in chunk]
            rows.append(in_place_losses(model, loss_fn, batch, params, adds))
            samples_per_pass = 1
    if j < len(draws):
        adds = [lambda draw=draw: torch._foreach_add_(params, draw()) for draw in draws[j:]]
        rows.append(in_place_losses(model, loss_fn, batch, params, adds))
    return torch.cat(rows)


def in_place_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[torch.Tensor],
    perturbations: list[Callable[[], Any]],
) -> torch.Tensor:
    """(n, K) task losses, one forward pass per perturbation, without grad: each callable
    perturbs ``params`` in place (e.g. adds its noise), the losses are evaluated, and the saved
    values are copied back, so the parameters end bit-exactly where they started (also on error)."""
    saved = flat_copy(params)
    rows = []
    with torch.no_grad():
        for perturb in perturbations:
            try:
                perturb()
                rows.append(loss_fn(model, batch).detach())
            finally:
                torch._foreach_copy_(params, unflatten(saved, params))
    return torch.stack(rows)


def flat_copy(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values, detached, one after another in one 1-D tensor (one op)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the last dimension of ``flat`` (a (P,) or (s, P) tensor) shaped as ``like``:
    (…, *t.shape) each, no copy."""
    lead = flat.shape[:-1]
    parts = flat.split([t.numel() for t in like], dim=-1)
    return [part.view(*lead, *t.shape) for part, t in zip(parts, like)]


def flat_sample_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    named: list[tuple[str, torch.Tensor]],
    noise: torch.Tensor,
    samples_per_pass: int,
) -> torch.Tensor:
    """(n, K) task losses at θ + ε_j, ε_j row j of ``noise`` (shape (n, P), the parameters of
    ``named`` one after another), without grad, ``samples_per_pass`` samples per forward pass.

    One per pass: row j's views are added in place and the saved values (one flat copy) copied
    back, so the parameters end bit-exactly where they started. More: the perturbed points are
    formed as one (s, P) sum and passed to ``vmap`` as views of it; a loss that ``vmap`` cannot
    run falls back to one per pass, with a warning, as ``sample_losses``."""
    params = [p for _, p in named]
    names = [name for name, _ in named]
    rows: list[torch.Tensor] = []
    j, n = 0, noise.shape[0]
    if samples_per_pass > 1:
        base = flat_copy(params)
        while j < n:
            points = base + noise[j : j + samples_per_pass]
            try:
                rows.append(stacked_point_losses(model, loss_fn, batch, dict(zip(names, unflatten(points, params)))))
            except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to the plain loop
                _warn_unbatchable(err)
                break
            j += points.shape[0]
    if j < n:
        adds = [lambda row=row: torch._foreach_add_(params, unflatten(row, params)) for row in noise[j:]]
        rows.append(in_place_losses(model, loss_fn, batch, params, adds))
    return torch.cat(rows)


def _warn_unbatchable(err: Exception) -> None:
    warnings.warn(
        f"samples_per_pass > 1 needs a loss that torch.func.vmap can run ({type(err).__name__}: {err}); "
        "evaluating one sample per pass",
        RuntimeWarning,
        stacklevel=4,
    )


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can substitute
    parameters for a loss that calls more than the model's ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def losses_at(model: nn.Module, loss_fn: LossFn, batch: Any, substitutes: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task losses with some parameters (by name in ``model``) replaced by other tensors,
    out of place: differentiable through those tensors, the model itself untouched."""
    renamed = {f"model.{name}": t for name, t in substitutes.items()}
    return torch.func.functional_call(_LossOf(model, loss_fn), renamed, (batch,), strict=False)


@dataclasses.dataclass
class EffectivePoint:
    """The model at one adapter step's effective weights: ``substitutes`` maps parameter names
    to W + ΔW (differentiable in the adapter's factors); ``applied()`` writes them into the
    parameters in place (detached) for a block of passes without grad and puts the parameters
    back bit-exactly after it."""

    model: nn.Module
    loss_fn: LossFn
    substitutes: dict[str, torch.Tensor]
    applied: Callable[[], AbstractContextManager[None]]

    def losses(self, batch: Any, moved: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The task losses at the effective weights (and at ``moved`` where given, by name),
        differentiable: one plain forward pass."""
        return losses_at(
            self.model, self.loss_fn, batch, self.substitutes if moved is None else {**self.substitutes, **moved}
        )

    def stacked_losses(self, first: Any, second: Any) -> torch.Tensor:
        """(2, K): the task losses on two batches of the same structure and shapes as one
        ``vmap``-ed forward pass over the stacked batches, differentiable (equal to two
        ``losses`` calls up to rounding: each batch's reductions run over that batch alone)."""
        stacked = torch.utils._pytree.tree_map(lambda a, b: torch.stack([a, b]), first, second)
        return torch.func.vmap(lambda b: self.losses(b), randomness="different")(stacked)

    def value(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        """The effective value of the parameter ``name``: W + ΔW for an adapted weight, else itself."""
        return self.substitutes.get(name, parameter)


def same_shapes(first: Any, second: Any) -> bool:
    """Whether two batches have the same structure, with tensors of the same shape, dtype and
    device in the same places and equal other leaves (so that they can be stacked)."""
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(first)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(second)
    if spec_a != spec_b:
        return False
    for a, b in zip(leaves_a, leaves_b):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return False
        elif not (a is b or (type(a) is type(b) and a == b)):
            return False
    return any(isinstance(a, torch.Tensor) for a in leaves_a)


class PairedLosses:
    """The task losses at an ``EffectivePoint`` on two batches (the current batch of L_g and a
    teleport batch of L_t): one stacked forward pass (``EffectivePoint.stacked_losses``) when
    ``stacked`` and the batches have the same shapes, else two plain ones. A loss that ``vmap``
    cannot run is warned about once and evaluated the plain way from then on."""

    def __init__(self, stacked: bool) -> None:
        self.stacked = stacked

    def __call__(self, point: EffectivePoint, first: Any, second: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stacked and same_shapes(first, second):
            try:
                both = point.stacked_losses(first, second)
                return both[0], both[1]
            except Exception as err:  # noqa: BLE001 - any tracing failure: two plain passes from now on
                warnings.warn(
                    f"stack_batches needs a loss that torch.func.vmap can run ({type(err).__name__}: {err}); "
                    "evaluating the two batches one after the other",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.stacked = False
        return point.losses(first), point.losses(second)
