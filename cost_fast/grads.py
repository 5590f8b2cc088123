"""Per-task gradients of the shared parameters, in one preallocated K x P buffer.

For K task losses L_1..L_K and shared parameters θ (P scalars in all), the engine fills

    G[i] = ∂L_i/∂θ  (flattened, parameters in the order given)      G ∈ R^{K×P}

into a buffer allocated once, through parameter-shaped views of it (no ``torch.cat`` per
step), and writes a combined update into the parameters' ``.grad`` (``GradientEngine``, the
interface every engine implements):

    θ.grad = Gᵀ w = Σ_i w_i ∇L_i = ∇(Σ_i w_i L_i)

with one matrix-vector product. Two ways to fill G, chosen by ``mode``:

- ``"loop"``: K calls of ``torch.autograd.grad``, one per task (the graph is kept between them).
- ``"batched"``: one call with ``is_grads_batched=True`` and the identity as the K grad outputs,
  i.e. a vmap over the backward pass. Fewer kernel launches; needs batching rules for every op
  in the graph, and holds K copies of the intermediate gradients at once.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from cost_fast.checks import check_int
from cost_fast.kernels import GramStats, gram_stats

Mode = Literal["loop", "batched"]


def check_task_losses(losses: torch.Tensor, num_tasks: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``losses`` is a 1-D float tensor of K = num_tasks losses."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a 1-D tensor of {num_tasks} task losses, got {type(losses).__name__}")
    if losses.ndim != 1 or losses.shape[0] != num_tasks:
        raise ValueError(f"losses must be a 1-D tensor of {num_tasks} task losses, got shape {tuple(losses.shape)}")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"losses must be floating point, got {losses.dtype}")


def _collect_parameters(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. module.parameters()), not one tensor")
    trainable: list[torch.Tensor] = []
    frozen: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a torch.Tensor")
        if id(p) in seen:
            raise ValueError(f"params[{i}] appears more than once (tied weights must be listed once)")
        seen.add(id(p))
        (trainable if p.requires_grad else frozen).append(p)
    if not trainable:
        raise ValueError(
            "no shared parameter requires grad"
            + (f" ({len(frozen)} frozen parameters were given)" if frozen else " (params is empty)")
        )
    devices = {p.device for p in trainable}
    if len(devices) > 1:
        raise ValueError(f"shared parameters are on several devices {sorted(map(str, devices))}; need one")
    dtypes = {p.dtype for p in trainable}
    if len(dtypes) > 1:
        raise ValueError(f"shared parameters have several dtypes {sorted(map(str, dtypes))}; need one")
    if not trainable[0].dtype.is_floating_point:
        raise TypeError(f"shared parameters must be floating point, got {trainable[0].dtype}")
    return trainable, frozen


def task_output_gradients(
    losses: torch.Tensor, outputs: list[torch.Tensor], eye: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Z_i = ∂L_i/∂z for every task i, for each tensor z of ``outputs``: one (K, *z.shape) tensor
    each (None where the losses do not reach z), from one batched backward pass with the rows of
    ``eye`` (the K x K identity) as the output gradients, or one pass per task where an op has no
    batching rule. The graph is kept."""
    try:
        return torch.autograd.grad(
            losses, outputs, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op without a batching rule: one pass per task
        rows = [torch.autograd.grad(losses[i], outputs, retain_graph=True, allow_unused=True) for i in range(len(eye))]
        return tuple(None if rows[0][j] is None else torch.stack([row[j] for row in rows]) for j in range(len(outputs)))


def _store_gradients(dst: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
    """Copy each gradient into its destination (multi-tensor), zeros where autograd returned None
    (a tensor the loss does not reach)."""
    reached = [(d, g) for d, g in zip(dst, grads) if g is not None]
    if reached:
        torch._foreach_copy_([d for d, _ in reached], [g for _, g in reached])
    unreached = [d for d, g in zip(dst, grads) if g is None]
    if unreached:
        torch._foreach_zero_(unreached)


class GradientEngine(abc.ABC):
    """The interface of a per-task gradient engine, declared once: ``TaskGradients`` (here),
    ``RepresentationGradients`` (here) and ``ShardedTaskGradients`` (``cost_fast.distributed``)
    implement it, and ``mtl_backward`` and ``COST`` use nothing else.

    Attributes:
        num_tasks: K (None for ``RepresentationGradients`` until its first ``compute``).
        params: the trainable shared parameters, in buffer order; ``frozen``: those skipped.
        grads: the (K, N) matrix whose rows the methods weight or aggregate (N = P for the
            parameter engines, this rank's P/R columns for the sharded one, the representation's
            size for ``RepresentationGradients``).
        combined: the (P,) buffer of the last update; ``combined_views``: parameter-shaped views.

    What an engine implements:

        compute(losses, retain_graph=False, share=1.0)   fill ``grads`` from the K losses: the
                     rows of share·G (``share`` is this rank's s_r of the global batch; 1 with
                     one process)
        stats()      ``GramStats`` of the whole G
        set_direction(d)   the update from a direction d in the rows' space, into ``combined``

    and what the base class gives every engine:

        combine(w)        d = Gᵀ w into ``combined`` (and added into ``.grad`` by default)
        write_update(d)   an update of shape (P,) into ``combined`` and added into ``.grad``
        close()           release what the engine registered (nothing here)

    ``.grad`` is written as torch's own backward does:

        θ.grad ← d              where θ.grad is None (as a view of ``combined``: no copy),
        θ.grad ← θ.grad + d     otherwise (gradient accumulation).

    Before ``combined`` is overwritten, a ``.grad`` that is still a view of it (an earlier update
    that no ``zero_grad`` cleared) is replaced by a copy, so nothing accumulated is lost."""

    num_tasks: int | None
    params: list[torch.Tensor]
    frozen: list[torch.Tensor]
    grads: torch.Tensor

    @abc.abstractmethod
    def compute(self, losses: torch.Tensor, *, retain_graph: bool = False, share: float = 1.0) -> torch.Tensor:
        """Fill and return ``grads`` from the K losses (class docstring)."""

    @abc.abstractmethod
    def stats(self) -> GramStats:
        """The Gram matrix of G and its conflict statistics (device tensors)."""

    @abc.abstractmethod
    def set_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The update from a direction in the rows' space, into ``combined``; returns it."""

    def _init_update_buffer(self, params: list[torch.Tensor]) -> None:
        first = params[0]
        self.sizes = [p.numel() for p in params]
        self.num_params = sum(self.sizes)
        self.combined = torch.empty(self.num_params, dtype=first.dtype, device=first.device)
        self.combined_views: list[torch.Tensor] = []
        offset = 0
        for p, n in zip(params, self.sizes):
            self.combined_views.append(self.combined[offset : offset + n].view(p.shape))
            offset += n

    def combine(self, weights: torch.Tensor, *, write_grad: bool = True) -> torch.Tensor:
        """Return d = Gᵀ w (shape (P,)) and, by default, add each shared parameter's slice of d
        into its ``.grad`` (class docstring: accumulates as backward does)."""
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a tensor of shape ({self.num_tasks},), got {type(weights).__name__}")
        if weights.shape != (self.num_tasks,):
            raise ValueError(f"weights must have shape ({self.num_tasks},), got {tuple(weights.shape)}")
        if weights.device != self.grads.device:
            raise ValueError(f"weights are on {weights.device} but the gradients on {self.grads.device}")
        self._weighted_rows(weights.to(self.grads.dtype))
        if write_grad:
            self._attach_grads()
        return self.combined

    def _weighted_rows(self, weights: torch.Tensor) -> None:
        """``combined`` ← the update of Gᵀ w (an engine with a cheaper way overrides it)."""
        self.set_direction(self.grads.T @ weights)

    def write_update(self, update: torch.Tensor) -> torch.Tensor:
        """Add an update vector d of shape (P,) computed elsewhere (e.g. by GradDrop or MoCo)
        into the shared parameters' ``.grad`` (class docstring); returns the engine's copy of it.

        Where ``.grad`` is None it becomes a view of one flat buffer owned by the engine, so an
        optimizer step reads d directly, without a copy.
        """
        if not isinstance(update, torch.Tensor) or update.shape != (self.num_params,):
            raise ValueError(f"update must be a tensor of shape ({self.num_params},)")
        if update is not self.combined:
            self._release_grads()
            self.combined.copy_(update)
        self._attach_grads()
        return self.combined

    def close(self) -> None:  # noqa: B027 - a default engines with nothing registered keep
        """Release what the engine registered (nothing for the parameter engines)."""

    def _release_grads(self) -> None:
        """Before ``combined`` is overwritten: a ``.grad`` still viewing it gets its own copy."""
        for p, view in zip(self.params, self.combined_views):
            if p.grad is view:
                p.grad = view.clone()

    def _attach_grads(self) -> None:
        """θ.grad ← d where it is None (a view, no copy), else θ.grad += d; a ``.grad`` that is
        already the view holds d."""
        for p, view in zip(self.params, self.combined_views):
            if p.grad is None:
                p.grad = view
            elif p.grad is not view:
                p.grad.add_(view)


class TaskGradients(GradientEngine):
    """Per-task gradient engine over a fixed list of shared parameters.

    Args:
        params: the shared parameters (e.g. ``model.backbone.parameters()``). Parameters with
            ``requires_grad=False`` are skipped (listed in ``self.frozen``); at least one must
            require grad. All must share one device and dtype.
        num_tasks: K, the number of task losses given to ``compute``.
        mode: ``"loop"`` or ``"batched"`` (see the module docstring).

    Attributes:
        grads: the (K, P) buffer; row i holds ∂L_i/∂θ after ``compute``.
        views: per parameter, a (K, *param.shape) view into ``grads``.
        combined: the (P,) buffer of the last update written by ``combine``/``write_update``.
        combined_views: per parameter, a param-shaped view into ``combined``.
        params: the trainable shared parameters, in buffer order.

    Example::

        engine = TaskGradients(model.backbone.parameters(), num_tasks=K)
        G = engine.compute(losses, retain_graph=True)   # (K, P)
        stats = engine.stats()                          # Gram matrix + conflicts
        engine.combine(weights)                         # backbone .grad = Gᵀ w
    """

    def __init__(self, params: Iterable[torch.Tensor], num_tasks: int, *, mode: Mode = "loop") -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be ≥ 1, got {num_tasks}")
        if mode not in ("loop", "batched"):
            raise ValueError(f"mode must be 'loop' or 'batched', got {mode!r}")
        self.params, self.frozen = _collect_parameters(params)
        self.num_tasks = num_tasks
        self.mode: Mode = mode
        first = self.params[0]
        self._init_update_buffer(self.params)
        self.grads = torch.empty((num_tasks, self.num_params), dtype=first.dtype, device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p, n in zip(self.params, self.sizes):
            self.views.append(self.grads[:, offset : offset + n].view(num_tasks, *p.shape))
            offset += n
        self._eye = torch.eye(num_tasks, dtype=first.dtype, device=first.device)

    def _check_losses(self, losses: torch.Tensor) -> None:
        check_task_losses(losses, self.num_tasks)
        if losses.device != self.grads.device:
            raise ValueError(f"losses are on {losses.device} but the shared parameters on {self.grads.device}")
        if not losses.requires_grad:
            raise ValueError("losses do not require grad: they are not connected to any parameter")

    def compute(self, losses: torch.Tensor, *, retain_graph: bool = False, share: float = 1.0) -> torch.Tensor:
        """Fill and return the (K, P) buffer with G[i] = share·∂losses[i]/∂θ.

        A parameter that task i does not reach gets a zero row block. ``retain_graph=True``
        keeps the graph for a later backward (e.g. of the task-specific heads). ``share``
        scales the rows (``GradientEngine``; 1, the default, leaves them as autograd gave them).
        """
        self._check_losses(losses)
        if self.mode == "batched":
            grads = torch.autograd.grad(
                losses,
                self.params,
                grad_outputs=self._eye.to(losses.dtype),
                retain_graph=retain_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
            _store_gradients(self.views, grads)
        else:
            last = self.num_tasks - 1
            for i in range(self.num_tasks):
                grads = torch.autograd.grad(
                    losses[i], self.params, retain_graph=retain_graph or i < last, allow_unused=True
                )
                _store_gradients([v[i] for v in self.views], grads)
        if share != 1.0:
            self.grads.mul_(share)
        return self.grads

    def stats(self, **kwargs) -> GramStats:
        """``cost_fast.kernels.gram_stats`` of the current buffer (no copy); kwargs pass through."""
        return gram_stats(self.grads, **kwargs)

    def _weighted_rows(self, weights: torch.Tensor) -> None:
        """``combined`` ← Gᵀ w by one matrix-vector product into it."""
        self._release_grads()
        torch.mv(self.grads.T, weights, out=self.combined)

    def set_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The update from a direction in the rows' space (here the parameters' own, so a
        copy into ``combined``); returns ``combined``."""
        self._release_grads()
        return self.combined.copy_(direction)


class RepresentationGradients(GradientEngine):
    """Per-task gradients of the shared representation z instead of the shared parameters (the
    MGDA-UB bound of Sener & Koltun; LibMTL's ``rep_grad``): with z = backbone(x) of shape (B, d),

        Z[i] = ∂L_i/∂z  (flattened, N = B·d numbers)       Z ∈ R^{K×N},

    from one batched backward pass through the heads (a pass per task where an op of the heads
    cannot be batched). A method weights or aggregates the rows of Z as it
    would those of G, and its direction d_z in z's space becomes the parameters' update by one
    backward pass through the backbone, θ.grad = J_zᵀ d_z: for weights w that is exactly
    Gᵀw = Σ_i w_i ∇_θ L_i (the chain rule), so only the weights (and the conflict statistics,
    taken from Z Zᵀ) are approximations. The same interface as ``TaskGradients``
    (``GradientEngine``); ``close()`` removes its forward hook.

    Args:
        backbone: the shared module; its output (one tensor) is captured by a forward hook,
            so ``compute`` must follow the forward pass that produced ``losses``.
        params: the backbone's trainable parameters. num_tasks: K (default: taken from the first
            ``compute``).
    """

    def __init__(self, backbone: torch.nn.Module, params: Iterable[torch.Tensor], num_tasks: int | None = None) -> None:
        check_int("num_tasks", num_tasks, 1, optional=True)
        self.params, self.frozen = _collect_parameters(params)
        self.num_tasks = num_tasks
        self._init_update_buffer(self.params)
        self.grads = torch.empty((num_tasks or 0, 0), dtype=self.params[0].dtype, device=self.params[0].device)
        self._captured: torch.Tensor | None = None
        self._representation: torch.Tensor | None = None
        self._paused = False
        self.hook = backbone.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self._paused:
            self._captured = output if isinstance(output, torch.Tensor) else None

    @contextlib.contextmanager
    def capture_paused(self) -> Iterator[None]:
        """Forward passes in the block (a check, an evaluation) leave the captured
        representation as it was."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def compute(self, losses: torch.Tensor, *, retain_graph: bool = False, share: float = 1.0) -> torch.Tensor:
        """Fill and return the (K, N) matrix Z[i] = share·∂losses[i]/∂z for the representation z
        of the last forward pass of the backbone (the graph is always kept: the update needs it)."""
        if self.num_tasks is None and isinstance(losses, torch.Tensor) and losses.ndim == 1:
            self.num_tasks = losses.shape[0]
        check_task_losses(losses, self.num_tasks)
        z = self._captured
        if z is None or not z.requires_grad:
            raise ValueError(
                "no representation to differentiate: the backbone's last forward pass returned no tensor "
                "that requires grad (compute the losses right before, with grad enabled)"
            )
        if self.grads.shape != (self.num_tasks, z.numel()):
            self.grads = torch.empty((self.num_tasks, z.numel()), dtype=z.dtype, device=z.device)
        eye = torch.eye(self.num_tasks, dtype=losses.dtype, device=losses.device)
        _store_gradients([self.grads.view(self.num_tasks, *z.shape)], task_output_gradients(losses, [z], eye))
        if share != 1.0:
            self.grads.mul_(share)
        self._representation = z
        return self.grads

    def stats(self) -> GramStats:
        """``gram_stats`` of Z (the representation's conflict statistics)."""
        return gram_stats(self.grads)

    def set_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """θ-update J_zᵀ d_z from a direction d_z (shape (N,)) in z's space, by one backward pass
        through the backbone, into ``combined``; returns it."""
        z = self._representation
        if z is None:
            raise RuntimeError("set_direction before compute")
        grads = torch.autograd.grad(
            z, self.params, grad_outputs=direction.to(z.dtype).view_as(z), retain_graph=True, allow_unused=True
        )
        self._release_grads()
        _store_gradients(self.combined_views, grads)
        return self.combined

    def close(self) -> None:
        """Detach the forward hook from the backbone (``combine``'s d = J_zᵀ Zᵀ w = Gᵀ w needs
        no more than the base class)."""
        self.hook.remove()
