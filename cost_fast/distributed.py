"""Data-parallel multi-task training on ``torch.distributed``, exact with respect to one process.

Each of the R ranks holds a part of the global batch (n_r samples of N) and computes its task
losses L^r (means over its samples). The global losses and per-task gradients are the weighted
means over ranks, with shares s_r = n_r / N:

    L = Σ_r s_r L^r,        G = Σ_r s_r G^r     (K x P).

``ShardedTaskGradients`` never gathers G: it reduce-scatters the K x P buffer along P, so that
rank r owns the columns of its shard (already summed over ranks), computes the K x K Gram matrix
of its shard and all-reduces it (K² numbers): M = Σ_shards G_s G_sᵀ = G Gᵀ exactly. The weights w
are then solved identically on every rank, each rank forms the update on its shard (G_sᵀ w) and
all-gathers it into the backbone's gradient. Per step that moves about (K + 1)·P numbers per rank
instead of the 2·K·P of an all-reduce of the whole buffer, and no rank holds more than P/R
columns of G after the reduce-scatter.

``global_losses`` makes everything else exact with one differentiable collective: it returns
Σ_r s_r L^r on every rank, and its backward passes the gradient back to the local losses scaled
by s_r, so that a function of the global losses computed identically on every rank (a loss
weighting's total, a teleport's L_t and L_g) backpropagates to each rank's part, and summing the
ranks' parameter gradients (``all_reduce_``) gives the single-process gradient. Decisions (the
trigger, a non-finite step, the guard, HTR) are computed from reduced values, so every rank
takes the same one.

``check_agreement`` runs once, when COST is built with a process group: one small collective
compares a fingerprint of everything that must match on every rank (the settings and the
parameters' values), and every rank raises the same error naming what differs, instead of
hanging in mismatched collectives or silently training apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from cost_fast.grads import GradientEngine, TaskGradients, check_task_losses
from cost_fast.kernels import GramStats, stats_from_gram
from cost_fast.kernels.gram_torch import gram_torch
from cost_fast.split_grads import OutputCapture, SplitTaskGradients
from cost_fast.teleport.config import TeleportConfig

# torch 2.13 renamed the single-tensor collectives (the old names warn); earlier versions have only those.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def default_group(group: Any = None) -> Any:
    """``group``, or torch.distributed's default group when it is initialized with more than one
    rank, else None (a single process)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class _GlobalSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; the gradient of a function computed identically on every rank
    from y flows back unchanged to each rank's x_r (its part of y)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def global_losses(local: torch.Tensor, batch_size: int, group: Any) -> tuple[torch.Tensor, float]:
    """(L, s_r): the global losses L = Σ_r n_r L^r / Σ_r n_r on every rank, differentiable (each
    rank's backward reaches its own L^r with weight s_r = n_r / N; sum the parameter gradients
    over ranks afterwards), and this rank's share s_r. One all-reduce carries the weighted
    losses and the batch sizes together."""
    count = torch.full((1,), float(batch_size), dtype=local.dtype, device=local.device)
    summed = _GlobalSum.apply(torch.cat([local * batch_size, count]), group)
    total = float(summed[-1].detach())
    if not total > 0:
        raise ValueError("the global batch is empty on every rank")
    return summed[:-1] / total, batch_size / total


def all_reduce_(tensors: Iterable[torch.Tensor | None], group: Any) -> None:
    """Sum each tensor over the ranks, in place (one flat collective; None entries skipped)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return
    flat = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in present:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class ShardedTaskGradients(GradientEngine):
    """``TaskGradients`` across the ranks of ``group`` (module docstring; the interface is
    ``GradientEngine``): ``compute`` fills this rank's shard of G (K x S columns, S = ⌈P/R⌉, the
    last shard zero-padded), ``stats`` is the Gram statistics of the whole G (all-reduced K x K),
    ``combine(w)`` adds the whole update Gᵀw into the parameters' ``.grad`` on every rank (each
    rank forms G_sᵀ w on its shard, then ``set_direction`` all-gathers it).

    Args:
        params: the shared parameters (identical on every rank). num_tasks: K.
        group: the process group. mode: the local ``TaskGradients`` mode.
    """

    def __init__(self, params: Iterable[torch.Tensor], num_tasks: int, group: Any, *, mode: str = "loop") -> None:
        self.local = TaskGradients(params, num_tasks, mode=mode)
        self.params, self.frozen = self.local.params, self.local.frozen
        self.num_tasks = num_tasks
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._init_update_buffer(self.params)
        first = self.params[0]
        self.shard = math.ceil(self.num_params / self.world)
        self._packed = torch.zeros((self.world, num_tasks, self.shard), dtype=first.dtype, device=first.device)
        self.grads = torch.empty((num_tasks, self.shard), dtype=first.dtype, device=first.device)
        self._gathered = torch.empty(self.world * self.shard, dtype=first.dtype, device=first.device)

    def compute(self, losses: torch.Tensor, *, retain_graph: bool = False, share: float = 1.0) -> torch.Tensor:
        """This rank's shard of G = Σ_r s_r G^r, ``share`` being this rank's s_r (from
        ``global_losses``)."""
        check_task_losses(losses, self.num_tasks)
        local = self.local.compute(losses, retain_graph=retain_graph)
        for r in range(self.world):
            begin, end = r * self.shard, min((r + 1) * self.shard, self.num_params)
            if end > begin:
                torch.mul(local[:, begin:end], share, out=self._packed[r, :, : end - begin])
        _reduce_scatter_single(self.grads.view(-1), self._packed.view(-1), group=self.group)
        return self.grads

    def stats(self) -> GramStats:
        """Statistics of the whole G from the all-reduced Gram matrix M = Σ_shards G_s G_sᵀ."""
        gram = gram_torch(self.grads).contiguous()
        dist.all_reduce(gram, group=self.group)
        return stats_from_gram(gram)

    def set_direction(self, direction: torch.Tensor) -> torch.Tensor:
        """The whole update from this rank's shard of it (all-gathered into ``combined``)."""
        _all_gather_single(self._gathered, direction.contiguous(), group=self.group)
        self._release_grads()
        return self.combined.copy_(self._gathered[: self.num_params])


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A SHA-256 digest of the tensors' values, shapes and dtypes (copied to the host once)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_agreement(settings: dict[str, str], tensors: Iterable[torch.Tensor], group: Any) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks have the same
    ``settings`` (name: description) and the same ``tensors`` (by ``fingerprint``); it names the
    settings that differ and the ranks that differ from rank 0. One ``all_gather_object``."""
    mine = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in settings.items()}
    mine["parameters"] = fingerprint(tensors)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (mine, settings), group=group)
    reference, described = everyone[0]
    differ = {
        name: [r for r, (theirs, _) in enumerate(everyone) if theirs.get(name) != digest]
        for name, digest in reference.items()
    }
    differ = {name: ranks for name, ranks in differ.items() if ranks}
    if differ:
        parts = []
        for name, ranks in differ.items():
            which = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
            if name == "parameters":
                parts.append(f"the parameters' values ({which} differ from rank 0: initialize or load them alike)")
            else:
                theirs = everyone[ranks[0]][1].get(name)
                parts.append(f"{name} (rank 0: {described[name]}; {which}: {theirs})")
        raise ValueError("the ranks of the process group do not agree on " + "; ".join(parts))


@dataclasses.dataclass(frozen=True)
class DataParallelConfig:
    """How COST trains across ranks (module docstring).

    Attributes:
        process_group: the group (default None: torch.distributed's default group when it is
            initialized with several ranks, else one process).
        batch_size: ``batch_size(batch) -> int``, this rank's samples in a batch, which weight
            its losses in the global ones (default None: ``first_dimension``).
    """

    process_group: Any = None
    batch_size: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and not callable(self.batch_size):
            raise TypeError(f"batch_size must be callable as batch_size(batch) -> int, got {self.batch_size!r}")


class Ranks:
    """The ranks a COST trains on: one process (``group`` None: every method here is the
    identity or does nothing) or a process group, where it holds COST's data-parallel plumbing
    (module docstring): the global losses, the sum of the heads' and the teleport's gradients,
    the sharded per-task gradients, the refusals and the agreement check.

    Args:
        config: ``DataParallelConfig`` (default: its defaults).
    """

    def __init__(self, config: DataParallelConfig | None = None) -> None:
        config = config if config is not None else DataParallelConfig()
        self.config = config
        self.group = default_group(config.process_group)
        self.batch_size = config.batch_size if config.batch_size is not None else first_dimension
        self.loads = 0  # COST states loaded on this rank (``loaded``)

    @property
    def parallel(self) -> bool:
        """Several ranks: every collective below runs."""
        return self.group is not None

    def refuse_unsupported(
        self, *, gradient_method: str | None, representation: bool, teleport: TeleportConfig, rescaling: bool
    ) -> None:
        """Raise ``ValueError`` for what COST cannot do across ranks, before anything is built
        (``gradient_method``: the name of a base method that needs every column of G, or None)."""
        if not self.parallel:
            return
        if gradient_method is not None:
            raise ValueError(f"{gradient_method} needs every column of G: not supported with a process group")
        if representation:
            raise ValueError("gradient_mode='representation' is not supported with a process group")
        if (teleport.samples_per_pass or 1) > 1:
            raise ValueError("samples_per_pass > 1 (vmapped samples) is not supported with a process group")
        if teleport.stack_batches:
            raise ValueError("stack_batches=True (a vmapped pass) is not supported with a process group")
        if rescaling:
            raise ValueError("the rescaling teleport is not supported with a process group")

    def check_agreement(self, settings: dict[str, str], tensors: Iterable[torch.Tensor]) -> None:
        """``check_agreement`` over this group (nothing with one process)."""
        if self.parallel:
            check_agreement(settings, tensors, self.group)

    def loaded(self) -> None:
        """A COST state was loaded on this rank: ``still_agree`` tells whether every rank did."""
        self.loads += 1

    def check_still_agree(self, tensors: list[torch.Tensor], settings: Callable[[], dict[str, str]]) -> None:
        """The first collective of a step: unless every rank has loaded as many COST states as
        this one and holds the same ``tensors`` (``still_agree``), every rank raises the same
        ``ValueError``, naming what differs among ``settings()`` and the tensors' values
        (``check_agreement``), so that a state or weights loaded on some ranks only are caught
        before any decision could differ. Nothing with one process."""
        if self.still_agree(tensors):
            return
        check_agreement(settings(), tensors, self.group)
        raise ValueError(
            "the ranks of the process group no longer agree: a COST state was loaded on some ranks only "
            "(load the same checkpoint on every rank)"
        )

    def still_agree(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every rank has loaded as many COST states as this one and holds the same
        ``tensors`` (by the sum of their squares, exact for bitwise-equal values): one
        all-gather of two numbers and one host read (True with one process)."""
        if not self.parallel:
            return True
        norms = torch._foreach_norm([t.detach() for t in tensors])
        first = tensors[0]
        mine = torch.stack(
            [torch.tensor(float(self.loads), dtype=torch.float64, device=first.device)]
            + [torch.stack([n.double() for n in norms]).square().sum()]
        )
        everyone = torch.empty(dist.get_world_size(self.group), 2, dtype=torch.float64, device=first.device)
        _all_gather_single(everyone.view(-1), mine, group=self.group)
        return bool((everyone == everyone[0]).all())

    def task_gradients(
        self, params: list[torch.Tensor], num_tasks: int, mode: str, capture: OutputCapture | None = None
    ) -> GradientEngine:
        """The per-task gradient engine: ``ShardedTaskGradients`` across ranks; with one process
        ``SplitTaskGradients`` over the backbone's captured output (``capture``), else
        ``TaskGradients``."""
        if self.parallel:
            return ShardedTaskGradients(params, num_tasks, self.group, mode=mode)
        if capture is not None:
            return SplitTaskGradients(params, num_tasks, capture, mode=mode)
        return TaskGradients(params, num_tasks=num_tasks, mode=mode)

    def global_losses(self, local: torch.Tensor, batch: Any) -> tuple[torch.Tensor, float]:
        """(L, s_r): the global losses L = Σ_r s_r L^r and this rank's share s_r
        (``global_losses``; ``local`` itself and 1 with one process)."""
        if not self.parallel:
            return local, 1.0
        return global_losses(local, self.batch_size(batch), self.group)

    def global_loss_fn(self, loss_fn: Any) -> Any:
        """``loss_fn(model, batch)`` giving the global losses, the same on every rank."""
        if not self.parallel:
            return loss_fn
        return lambda model, batch: self.global_losses(loss_fn(model, batch), batch)[0]

    def sum_over_ranks(self, grads: list[torch.Tensor | None]) -> None:
        """Sum each rank's share of some gradients (the heads', the adapter's) in place, so that
        every rank holds the single-process gradient; nothing with one process."""
        if self.parallel:
            all_reduce_(grads, self.group)


def first_dimension(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (nested in tuples, lists or
    dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for item in items:
        try:
            return first_dimension(item)
        except ValueError:
            continue
    raise ValueError("cannot tell the batch size: pass COST(batch_size=...)")
