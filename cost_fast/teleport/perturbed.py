"""Task losses at perturbed parameters, without autograd and without copying the model.

Both COST semantics measure sharpness from the task losses at n points θ + ε_j. Here those
points are evaluated in one of two ways, with the same result:

- one sample per forward pass (``in_place_losses``): ε_j is added to the parameters in place
  by multi-tensor ops and the saved values are copied back, so the parameters end bit-exactly
  where they started (also on error);
- s samples per pass (``batched_losses``): ``torch.func.vmap`` over s stacked perturbed copies
  of the perturbed parameters (not of the model: s times their memory, freed after the pass),
  which turns s small launches of every layer into one batched one.

``sample_losses`` chooses between them and falls back to one per pass, with a warning, for a
loss that ``vmap`` cannot trace. ``losses_at`` evaluates the losses out of place at substituted
parameters, differentiably; ``EffectivePoint`` is the model at an adapter step's effective
weights W + ΔW, both ways: differentiably (``losses``) and in place for no-grad passes
(``applied``).
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
            warnings.warn(
                f"samples_per_pass > 1 needs a loss that torch.func.vmap can run ({type(err).__name__}: {err}); "
                "evaluating one sample per pass",
                RuntimeWarning,
                stacklevel=3,
            )
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
    saved = [p.detach().clone() for p in params]
    rows = []
    with torch.no_grad():
        for perturb in perturbations:
            try:
                perturb()
                rows.append(loss_fn(model, batch).detach())
            finally:
                torch._foreach_copy_(params, saved)
    return torch.stack(rows)


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

    def value(self, name: str, parameter: torch.Tensor) -> torch.Tensor:
        """The effective value of the parameter ``name``: W + ΔW for an adapted weight, else itself."""
        return self.substitutes.get(name, parameter)
