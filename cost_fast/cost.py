"""``COST``: a drop-in multi-task step with COST's teleport (reference semantics).

Per ``step(losses, batch)``:

1. per-task gradients of the shared backbone (``TaskGradients``) and their Gram statistics
   (``gram_stats``), on the device;
2. the trigger: ``semantics="reference"`` (the public code, default) ``min_i cos(g_i, g0) ≤ 0``;
   ``semantics="paper"``: ≥ ⌈K/2⌉ tasks with cos(g_i, g0) < 0 (Eq. 4); only from ``start_step``
   / ``start_epoch`` on and at most ``max_teleports_per_epoch`` times per epoch (one host read);
3. if it fires: ``teleport`` (see ``cost_fast.teleport`` for both semantics: LoRA adapter trained
   on L_t and L_g, merged, guarded), then HTR on Adam/AdamW with σ = cos(Δθ, g'), g' the last
   combined update (reference) or the combined gradient at the pre-teleport point (paper, Eq.
   12); σ ≤ 0 gives a fresh Adam state. That step updates no parameter, as in the public code;
4. otherwise the base method's update: Gram-based methods give w from M, loss weightings w from
   the losses, gradient-based ones (GradDrop, MoCo) the backbone update itself; the heads get
   the gradient of Σ w_i L_i, the backbone Gᵀw; then ``optimizer.step()``.

Call ``end_epoch()`` after each epoch (it resets the per-epoch teleport count).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from cost_fast.aggregators.base import Aggregator
from cost_fast.grads import Mode, TaskGradients
from cost_fast.htr import apply_htr, flat_cosine, supports_htr
from cost_fast.kernels import gram_stats
from cost_fast.lora import TeleportAdapter
from cost_fast.teleport import LossFn, TeleportConfig, paper_ratio_weights, reference_ratio_weights, teleport
from cost_fast.weighting.base import LossWeighting


@dataclasses.dataclass
class StepInfo:
    """What one ``COST.step`` saw and did (host values)."""

    step: int
    epoch: int
    num_dominated: int
    num_conflicting_pairs: int
    min_cos_mean: float
    mean_norm: float  # ‖g0‖, the norm of the mean task gradient
    trigger: bool
    teleported: bool = False
    rolled_back: bool = False
    sigma: float | None = None
    htr: str | None = None
    teleport_steps: int = 0
    task_terms: list[float] = dataclasses.field(default_factory=list)  # L_t per adapter step
    sharpness_terms: list[float] = dataclasses.field(default_factory=list)  # L_g per adapter step
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class COST:
    """Multi-task training step with COST teleportation (see the module docstring).

    Args:
        model: the whole multi-task model.
        shared: its shared backbone (a submodule of ``model``); the LoRA adapter is injected
            into it once, here.
        base: the base method: an ``Aggregator`` (``get_aggregator("fairgrad")``, ...) or a
            ``LossWeighting``.
        optimizer: over ``model.parameters()``; Adam/AdamW get HTR, others none.
        loss_fn: ``loss_fn(model, batch) -> Tensor[K]``, used by the teleport.
        teleport_data: re-iterable batches for the teleport (the public code: the training loader).
        semantics: ``"reference"`` (default) or ``"paper"``: trigger rule, R weights, default
            teleport settings and the g' of HTR.
        start_step, start_epoch: no teleport before these (delayed start).
        max_teleports_per_epoch: frequency control (default 1).
        rank: adapter rank (default 5). adapter: ``"lora"`` (default) or ``"loha"``.
        teleport: ``TeleportConfig`` (default: the semantics' settings at the lr of the
            optimizer's first group). gradient_mode: ``TaskGradients`` mode.
        seed: seed of the teleport's noise generator.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module,
        base: Aggregator | LossWeighting,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        teleport_data: Iterable[Any],
        *,
        semantics: Literal["reference", "paper"] = "reference",
        start_step: int = 0,
        start_epoch: int = 0,
        max_teleports_per_epoch: int = 1,
        rank: int = 5,
        adapter: str = "lora",
        teleport: TeleportConfig | None = None,
        gradient_mode: Mode = "loop",
        seed: int = 0,
    ) -> None:
        if not isinstance(base, Aggregator | LossWeighting):
            raise TypeError(f"base must be an Aggregator or a LossWeighting, got {type(base).__name__}")
        if semantics not in ("reference", "paper"):
            raise ValueError(f"semantics must be 'reference' or 'paper', got {semantics!r}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> Tensor[K]")
        if min(start_step, start_epoch) < 0 or max_teleports_per_epoch < 0:
            raise ValueError("start_step, start_epoch and max_teleports_per_epoch must be ≥ 0")
        if not any(m is shared for m in model.modules()):
            raise ValueError("shared must be a submodule of model")
        self.model, self.shared, self.base, self.optimizer = model, shared, base, optimizer
        self.loss_fn, self.teleport_data = loss_fn, teleport_data
        self.semantics = semantics
        self.start_step, self.start_epoch = start_step, start_epoch
        self.max_teleports_per_epoch = max_teleports_per_epoch
        lr = optimizer.param_groups[0]["lr"]
        self.teleport_config = teleport or TeleportConfig.for_semantics(semantics, lr=lr)
        if self.teleport_config.semantics != semantics:
            raise ValueError(f"teleport config has semantics {self.teleport_config.semantics!r}, COST {semantics!r}")
        self.gradient_mode: Mode = gradient_mode
        shared_params = [p for p in shared.parameters() if p.requires_grad]
        shared_ids = {id(p) for p in shared.parameters()}
        self.adapter = TeleportAdapter(shared, rank=rank, method=adapter)
        adapter_ids = {id(p) for p in self.adapter.adapter_parameters}
        self.task_params = [p for p in model.parameters() if id(p) not in shared_ids | adapter_ids and p.requires_grad]
        self._shared_params = shared_params
        self.engine: TaskGradients | None = None
        self._last_update: torch.Tensor | None = None
        self.generator = torch.Generator(device=shared_params[0].device).manual_seed(seed)
        self.step_count = 0
        self.epoch = 0
        self.teleports_this_epoch = 0
        self.has_update = False

    def state_dict(self) -> dict[str, Any]:
        """Counters, noise generator, the base method's state and the last update (HTR's g'),
        so that a resumed run continues as an uninterrupted one. The model's and the
        optimizer's own state dicts are saved by the caller, as usual."""
        return {
            "step_count": self.step_count,
            "epoch": self.epoch,
            "teleports_this_epoch": self.teleports_this_epoch,
            "has_update": self.has_update,
            "generator": self.generator.get_state(),
            "base": self.base.state_dict(),
            "last_update": None if self.engine is None else self.engine.combined.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the engine is rebuilt at the next step)."""
        self.step_count = state["step_count"]
        self.epoch = state["epoch"]
        self.teleports_this_epoch = state["teleports_this_epoch"]
        self.has_update = state["has_update"]
        self.generator.set_state(state["generator"])
        self.base.load_state_dict(state["base"])
        self._last_update = state["last_update"]

    def end_epoch(self) -> None:
        """Start a new epoch for the frequency control and ``start_epoch``."""
        self.epoch += 1
        self.teleports_this_epoch = 0

    def _allowed(self) -> bool:
        return (
            self.step_count >= self.start_step
            and self.epoch >= self.start_epoch
            and self.teleports_this_epoch < self.max_teleports_per_epoch
        )

    def step(self, losses: torch.Tensor, batch: Any) -> StepInfo:
        """One training step from the K task losses of ``batch`` (with their graph)."""
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        if self.engine is None:
            if not isinstance(losses, torch.Tensor) or losses.ndim != 1 or losses.shape[0] < 1:
                raise ValueError("losses must be a non-empty 1-D tensor of the K task losses")
            self.engine = TaskGradients(self._shared_params, num_tasks=losses.shape[0], mode=self.gradient_mode)
            if self._last_update is not None:
                self.engine.combined.copy_(self._last_update)
        engine = self.engine
        engine.compute(losses, retain_graph=True)
        t1 = time.perf_counter()
        stats = gram_stats(engine.grads)
        if self.semantics == "paper":
            fires = stats.trigger
        else:
            fires = (stats.cos_mean.min() <= 0) & ~stats.nonfinite
        t2 = time.perf_counter()
        times["gradients"], times["gram"] = t1 - t0, t2 - t1
        # the step's one host transfer: the trigger decision and the statistics it reports
        dominated, pairs, min_cos, mean_norm, fired = torch.stack(
            [
                stats.num_dominated.double(),
                stats.num_conflicting_pairs.double(),
                stats.cos_mean.min().double(),
                stats.mean_norm.double(),
                fires.double(),
            ]
        ).tolist()
        info = StepInfo(
            step=self.step_count,
            epoch=self.epoch,
            num_dominated=int(dominated),
            num_conflicting_pairs=int(pairs),
            min_cos_mean=min_cos,
            mean_norm=mean_norm,
            trigger=bool(fired),
            seconds=times,
        )
        if info.trigger and self._allowed():
            self._teleport(losses, stats, batch, info)
            times["teleport"] = time.perf_counter() - t2
        else:
            self._base_update(losses, stats.gram)
            times["solve_and_step"] = time.perf_counter() - t2
        self.step_count += 1
        return info

    def _direction(self, losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """The base method's task weights w (ones for methods that aggregate G themselves) and,
        in the engine's ``combined`` buffer, the backbone update d (Gᵀw or the method's own)."""
        engine = self.engine
        dtype = engine.grads.dtype
        if isinstance(self.base, Aggregator) and self.base.kind == "grads":
            engine.combined.copy_(self.base.aggregate(engine.grads).to(dtype))
            return torch.ones(losses.shape[0], dtype=dtype, device=engine.grads.device)
        w = self.base.weights(losses if isinstance(self.base, LossWeighting) else gram).to(dtype)
        engine.combine(w, write_grad=False)
        return w

    def _base_update(self, losses: torch.Tensor, gram: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        w = self._direction(losses, gram)
        if self.task_params:
            (losses @ w.to(losses)).backward(inputs=self.task_params)
        self.engine.write_update(self.engine.combined)
        self.optimizer.step()
        self.has_update = True

    def _teleport(self, losses: torch.Tensor, stats, batch: Any, info: StepInfo) -> None:
        if self.semantics == "paper":
            self._direction(losses, stats.gram)  # g': the combined gradient before the teleport
            ratios = paper_ratio_weights(stats.norms)
        else:
            ratios = reference_ratio_weights(stats.norms)  # g' stays the last step's update
        result = teleport(
            self.model,
            self.adapter,
            self.loss_fn,
            self.teleport_data,
            batch,
            ratios,
            self.teleport_config,
            generator=self.generator,
        )
        self.teleports_this_epoch += 1
        info.teleported = not result.rolled_back
        info.rolled_back = result.rolled_back
        info.teleport_steps = result.steps
        info.task_terms, info.sharpness_terms = result.task_terms, result.sharpness_terms
        self.optimizer.zero_grad(set_to_none=True)
        has_direction = self.has_update or self.semantics == "paper"
        if result.rolled_back or not has_direction or not supports_htr(self.optimizer):
            return
        delta_of = {id(p): d for p, d in zip(self.adapter.base_parameters, result.deltas)}
        deltas = [delta_of[id(p)] for p in self.engine.params]
        sigma = float(flat_cosine(deltas, self.engine.combined_views))
        info.sigma = sigma
        info.htr = apply_htr(self.optimizer, max(-1.0, min(1.0, sigma)))
