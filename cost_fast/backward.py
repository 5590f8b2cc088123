"""The multi-task backward pass in one call: ``mtl_backward``.

For K task losses L_1..L_K, shared parameters θ and the rest of the model's trainable tensors
(the heads, φ), a method turns the per-task gradients G[i] = ∂L_i/∂θ into one update and

    θ.grad += Gᵀw            (a Gram method, w = method.weights(G Gᵀ); or a loss weighting,
                              w_i = ∂total/∂L_i; a gradient method adds its own d = method.aggregate(G))
    φ.grad += ∇_φ Σ_i w_i L_i (a gradient method: ∇_φ Σ_i L_i; a loss weighting: ∇_φ total, and
                              its learned parameters get ∇ total too)

accumulating into ``.grad`` as ``loss.backward()`` does. The update itself is
``cost_fast.update.base_update``, the same that ``COST``'s step takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from cost_fast.grads import TaskGradients
from cost_fast.kernels import GramStats
from cost_fast.methods import Method, as_method
from cost_fast.update import NONFINITE, base_update, hand_to_scaler
from cost_fast.weighting.base import LossWeighting

Losses = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BackwardResult:
    """What ``mtl_backward`` computed.

    Attributes:
        losses: the K task losses (detached), in task order.
        weights: w (K,) for a Gram method or a loss weighting; None for a gradient method.
        stats: the Gram matrix of the task gradients and its conflict statistics (``GramStats``,
            device tensors), unscaled when a GradScaler was given.
        task_names: the keys of a dict of losses, in its order; None for a tensor or a list.
        skipped: why nothing but NaN for the GradScaler was added (non-finite values under an
            enabled scaler, which then skips its step and lowers its scale), else None.
    """

    losses: torch.Tensor
    weights: torch.Tensor | None
    stats: GramStats
    task_names: tuple[str, ...] | None
    skipped: str | None = None


def stack_losses(losses: Losses) -> tuple[torch.Tensor, tuple[str, ...] | None]:
    """The K task losses as one (K,) tensor (a view of the graph, so gradients flow) and the task
    names: a 1-D tensor as it is; a list or tuple of scalar tensors stacked in order; a dict of
    scalar tensors stacked in its order, its keys (strings) the names."""
    names: tuple[str, ...] | None = None
    if isinstance(losses, torch.Tensor):
        if losses.ndim != 1 or losses.shape[0] < 1:
            raise ValueError(
                f"losses must be a non-empty 1-D tensor of the K task losses, got shape {tuple(losses.shape)}"
            )
        return losses, None
    if isinstance(losses, Mapping):
        if not all(isinstance(k, str) for k in losses):
            raise TypeError(f"the task names (the dict's keys) must be strings, got {list(losses)!r}")
        names, items = tuple(losses), list(losses.values())
    elif isinstance(losses, Sequence) and not isinstance(losses, str):
        items = list(losses)
    else:
        raise TypeError(
            f"losses must be a tensor, a list of scalar tensors or a dict of them, got {type(losses).__name__}"
        )
    if not items:
        raise ValueError("losses is empty: at least one task loss is needed")
    for i, item in enumerate(items):
        where = repr(names[i]) if names is not None else str(i)
        if not isinstance(item, torch.Tensor) or item.numel() != 1:
            got = f"shape {tuple(item.shape)}" if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"loss {where} must be a scalar tensor, got {got}")
    devices = {item.device for item in items}
    if len(devices) > 1:
        raise ValueError(f"the task losses are on several devices: {sorted(map(str, devices))}")
    return torch.stack([item.reshape(()) for item in items]), names


def graph_leaves(outputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors ``backward`` on ``outputs`` would accumulate into: every leaf that requires
    grad and is reached from their autograd graph, in the order first reached."""
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    leaves: list[torch.Tensor] = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def mtl_backward(
    losses: Losses,
    shared: nn.Module | Iterable[torch.Tensor],
    method: Method | str | Any,
    *,
    heads: Iterable[torch.Tensor] | None = None,
    head_gradients: Literal["weighted", "per_task"] = "weighted",
    mode: Literal["loop", "batched"] = "loop",
    scaler: torch.amp.GradScaler | None = None,
) -> BackwardResult:
    """One multi-task backward pass (module docstring): the per-task gradients of the shared
    parameters, the method's update added into their ``.grad`` (θ.grad += Gᵀw), and
    ∇ Σ_i w_i L_i added into every other tensor the losses reach (the heads).

    Args:
        losses: the K task losses, with their graph: a 1-D tensor, a list of scalar tensors or a
            dict ``{task name: loss}`` (the names come back in ``BackwardResult.task_names``).
        shared: the shared backbone (a module: its parameters that require grad) or its
            parameters.
        method: a method instance (an ``Aggregator``, a ``GradientAggregator`` or a
            ``LossWeighting``, kept by the caller so that its state carries over), a plain
            function ``gram -> weights``, or the name of a stateless method
            (``get_aggregator(name)``; a name of a method with state is refused, as a new one
            would be built at every call).
        heads: the tensors that get ∇ Σ_i w_i L_i (default: every leaf that requires grad
            reached from the losses' graph, minus the shared parameters).
        head_gradients: ``"weighted"`` (default: the heads get ∇ Σ_i w_i L_i, the gradient of
            the total the method weights) or ``"per_task"`` (head i gets its own ∇L_i, i.e.
            ∇ Σ_i L_i: torchjd's ``mtl_backward`` and the public COST code).
        mode: how the per-task gradients are computed (``TaskGradients``): ``"loop"`` (K
            backward passes, default) or ``"batched"`` (one vmapped backward).
        scaler: an enabled ``torch.amp.GradScaler``: pass the plain losses; the gradients are
            computed of s·L_i and added scaled for ``scaler.step``, the method solved on the
            unscaled statistics (so its weights never depend on the scale).

    Non-finite losses, task gradients, weights or updates change no ``.grad``: without a scaler
    ``FloatingPointError`` says so; with an enabled scaler NaN is added for it, which skips the
    optimizer step and lowers its scale as after a plain backward that overflowed
    (``BackwardResult.skipped`` says why).

    Returns:
        ``BackwardResult`` (losses, weights, statistics, task names).
    """
    stacked, names = stack_losses(losses)
    if not stacked.dtype.is_floating_point:
        raise TypeError(f"losses must be floating point, got {stacked.dtype}")
    if not stacked.requires_grad:
        raise ValueError("the losses have no graph (computed under torch.no_grad, or of detached tensors)")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if head_gradients not in ("weighted", "per_task"):
        raise ValueError(f"head_gradients must be 'weighted' or 'per_task', got {head_gradients!r}")
    num_tasks = stacked.shape[0]
    method = as_method(method, num_tasks=num_tasks, allow_stateful_name=False)
    if isinstance(method, LossWeighting):
        method.check_losses(stacked)
    shared_params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    engine = TaskGradients(shared_params, num_tasks=num_tasks, mode=mode)
    shared_ids = {id(p) for p in shared_params}
    if heads is None:
        head_params = [t for t in graph_leaves([stacked]) if id(t) not in shared_ids]
    else:
        head_params = list(heads)
        overlap = [i for i, t in enumerate(head_params) if id(t) in shared_ids]
        if overlap:
            raise ValueError(
                f"heads[{overlap[0]}] is a shared parameter: the heads and the shared parameters must be apart"
            )
    scale = None
    if scaler is not None and scaler.is_enabled():
        scale = scaler.scale(torch.ones((), dtype=torch.float32, device=stacked.device))
    engine.compute(stacked if scale is None else stacked * scale, retain_graph=True)
    stats = engine.stats()
    if scale is not None:
        stats = stats.unscaled(scale)
    reason = None if bool(torch.isfinite(stacked).all() & ~stats.nonfinite) else NONFINITE
    update = (
        reason
        if reason is not None
        else base_update(method, stacked, engine, stats.gram, scale, heads=head_params, head_gradients=head_gradients)
    )
    if isinstance(update, str):
        if scale is None:
            raise FloatingPointError(f"{update}; no .grad was changed")
        hand_to_scaler(engine)
        return BackwardResult(stacked.detach(), None, stats, names, f"{update} (handed to the GradScaler)")
    update.write()
    return BackwardResult(losses=stacked.detach(), weights=update.weights, stats=stats, task_names=names)
