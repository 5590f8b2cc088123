"""The base update, written once: how a method's kind becomes an update of every parameter.
``mtl_backward`` and COST's step (``cost_fast.step``) both call ``base_update``.

For K task losses L_i, per-task gradients G (rows ∂L_i/∂θ of the shared parameters θ, held by a
``GradientEngine``) and the other trainable tensors φ (the heads, and a loss weighting's learned
parameters), one base update is

    θ.grad += Gᵀw       a Gram method: w = method.weights(M), M = G Gᵀ;
                        a loss weighting: w_i = ∂total/∂L_i, total = method(L);
    θ.grad += d         a gradient method: its own d = method.aggregate(G);
    φ.grad += ∇_φ Σ_i w_i L_i   (a loss weighting: ∇_φ total; a gradient method, or
                        ``head_gradients="per_task"``: ∇_φ Σ_i L_i, each head its own ∇L_i)

(times K on the backbone with ``scale_backbone_by_tasks``, the public COST code's step). With a
GradScaler's scale s, G holds the gradients of s·L: every method is solved on unscaled values
and the update is added scaled, for ``scaler.step`` to unscale.

``base_update`` computes everything and checks it finite before anything is added to
``.grad`` (``BaseUpdate.write`` adds it), so that a non-finite result never spoils an
accumulated gradient: it returns the reason instead, the method's state put back (a gradient
method whose state is as large as G, ``state_like_gradients``, is not copied: its state has
taken the refused step, with this step's finite G). ``hand_to_scaler`` is what a
skipped step under a GradScaler writes: NaN, so that the scaler skips the optimizer step and
lowers its scale, as after a plain backward that overflowed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from cost_fast import host
from cost_fast.aggregators.base import Aggregator
from cost_fast.checks import all_finite
from cost_fast.grads import GradientEngine
from cost_fast.methods import Method
from cost_fast.weighting.base import LossWeighting

HeadGradients = Literal["weighted", "per_task"]

NONFINITE = "non-finite losses or task gradients"
NONFINITE_UPDATE = "non-finite weights, update or head gradients"
# A gradient method's state (MoCo's, ExcessMTL's: K x P) is not snapshotted, so a non-finite
# update it makes from finite gradients leaves that state one step on.
NONFINITE_GRADIENT_METHOD_UPDATE = "non-finite update (the gradient method's state has taken this step)"


def apply_method(
    method: Method,
    losses: torch.Tensor,
    engine: GradientEngine,
    gram: torch.Tensor,
    scale: torch.Tensor | None,
    host_gram: torch.Tensor | None = None,
    known_losses: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The method's update of the shared parameters into ``engine.combined`` (Gᵀw, or a gradient
    method's own d; times s when G holds the gradients of s·L, the method solved on unscaled
    values), nothing written to ``.grad``: the one dispatch over the kinds of method. Returns
    the total whose gradient the other parameters get (Σ w_i L_i; a weighting's own total, so
    that its learned parameters get theirs; Σ L_i for a gradient method) and w (None for a
    gradient method). A Gram method solves on the host (``cost_fast.host``): on ``host_gram``,
    M already read back with the step's decision, or on one transfer of ``gram``; a loss
    weighting checks the losses' values on ``known_losses``, their host copy, where given."""
    dtype = engine.grads.dtype
    if isinstance(method, LossWeighting):
        total = method(losses) if known_losses is None else method.total_of_known(losses, known_losses)
        (w,) = torch.autograd.grad(total, losses, retain_graph=True)
        engine.combine(w.to(dtype), write_grad=False)
        return total, w.detach()
    if method.kind == "grads":
        if scale is not None:
            engine.grads.div_(scale.to(dtype))  # the method (and its state) sees unscaled G
        direction = method.aggregate(engine.grads).to(dtype)
        engine.set_direction(direction if scale is None else direction * scale.to(dtype))
        return losses.sum(), None
    if host_gram is None:
        host_gram = host.to_host(gram)
    with host.section():
        w = method.weights(host_gram)
    w = w.to(device=engine.grads.device, dtype=dtype)
    engine.combine(w, write_grad=False)
    return losses @ w.to(losses), w


def gradients(
    total: torch.Tensor, params: list[torch.Tensor], *, retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """∇total for each of ``params`` (None where it does not reach one), nothing written to ``.grad``."""
    if not params:
        return []
    return list(torch.autograd.grad(total, params, retain_graph=retain_graph, allow_unused=True))


def add_into_grad(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """``.grad`` ← g where it is None, else ``.grad`` + g: what ``backward`` does."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


@dataclasses.dataclass
class BaseUpdate:
    """A base update computed and checked finite, not yet added to ``.grad`` (``write``).

    Attributes:
        engine: holds the shared parameters' update in ``engine.combined``.
        others: the other tensors that get a gradient (heads, then a weighting's learned ones).
        grads: their gradients, aligned with ``others`` (None where the losses do not reach one).
        weights: w (K,) of a Gram method or a loss weighting; None for a gradient method.
    """

    engine: GradientEngine
    others: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    weights: torch.Tensor | None

    def write(self) -> None:
        """Add the update into ``.grad``, as ``backward`` does: the shared parameters' from
        ``engine.combined``, the others' from ``grads``."""
        self.engine.write_update(self.engine.combined)
        add_into_grad(self.others, self.grads)


def base_update(
    method: Method,
    losses: torch.Tensor,
    engine: GradientEngine,
    gram: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    heads: list[torch.Tensor],
    head_gradients: HeadGradients = "weighted",
    scale_backbone_by_tasks: bool = False,
    sum_over_ranks: Callable[[list[torch.Tensor | None]], None] | None = None,
    host_gram: torch.Tensor | None = None,
    known_losses: torch.Tensor | None = None,
) -> BaseUpdate | str:
    """The base update of ``method`` (module docstring) for ``losses`` (with their graph),
    their per-task gradients in ``engine`` and its Gram matrix ``gram`` (unscaled), or the
    reason it is refused (``NONFINITE_UPDATE``, ``NONFINITE_GRADIENT_METHOD_UPDATE``).

    ``heads``: the tensors other than the shared parameters that get a gradient (a loss
    weighting's learned parameters are added). ``scale``: a GradScaler's scale s as a device
    tensor, or None. ``sum_over_ranks``: sums each rank's share of the heads' gradients in
    place (data parallel; None with one process). ``host_gram``, ``known_losses``: M and the
    losses already on the host (the step's decision read brought them), or None. Nothing is
    written to ``.grad``."""

    def scaled(total: torch.Tensor) -> torch.Tensor:
        return total if scale is None else total * scale.to(total)

    learned = [p for p in method.parameters() if p.requires_grad] if isinstance(method, LossWeighting) else []
    if isinstance(method, Aggregator) and method.kind == "grads" and method.state_like_gradients:
        # The method's state (MoCo's: K x P) is not copied: a step refused after the method ran
        # (its update or the heads' gradient not finite) leaves that state moved, by a finite G
        # (the step's decision checked G), and the step reads the device once, as every other.
        head_grads = gradients(scaled(losses.sum()), heads)
        if sum_over_ranks is not None:
            sum_over_ranks(head_grads)
        _, weights = apply_method(method, losses, engine, gram, scale, host_gram)
        if not all_finite([engine.combined, *head_grads]):
            return NONFINITE_GRADIENT_METHOD_UPDATE
        learned_grads: list[torch.Tensor | None] = []
    else:
        saved = copy.deepcopy(method.state_dict())  # small: K-sized buffers, generators, counts
        total, weights = apply_method(method, losses, engine, gram, scale, host_gram, known_losses)
        if head_gradients == "per_task":
            head_grads = gradients(scaled(losses.sum()), heads, retain_graph=bool(learned))
            learned_grads = gradients(scaled(total), learned)
        else:
            both = gradients(scaled(total), heads + learned)
            head_grads, learned_grads = both[: len(heads)], both[len(heads) :]
        if sum_over_ranks is not None:
            sum_over_ranks(head_grads)
        if not all_finite([engine.combined, *head_grads, *learned_grads]):
            method.load_state_dict(saved)
            return NONFINITE_UPDATE
    if scale_backbone_by_tasks:
        engine.combined.mul_(engine.num_tasks)
    return BaseUpdate(engine, heads + learned, head_grads + learned_grads, weights)


def hand_to_scaler(engine: GradientEngine) -> None:
    """A skipped step under a GradScaler: NaN into the shared parameters' ``.grad``, so that the
    scaler skips the optimizer step and lowers its scale (module docstring)."""
    engine.write_update(torch.full_like(engine.combined, float("nan")))
