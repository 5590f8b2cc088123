"""``COST``: a drop-in multi-task step with COST's teleport.

Per ``step(losses, batch)`` (or ``backward(losses, batch)``, which leaves ``optimizer.step()``
to the caller):

1. per-task gradients of the shared backbone (``TaskGradients``) and their Gram statistics
   (``gram_stats``), on the device;
2. non-finite losses or task gradients: the step changes nothing (``nonfinite="skip"``, the
   default, reported in ``StepInfo.skipped``) or raises ``FloatingPointError``
   (``nonfinite="raise"``);
3. the semantics' trigger (``cost_fast.semantics``), only from ``start_step`` / ``start_epoch``
   on and at most ``max_teleports_per_epoch`` times per epoch (one host read);
4. if it fires: ``teleport`` (LoRA adapter trained on L_t and L_g, merged, guarded), then HTR
   on Adam/AdamW with σ = cos(Δθ, g') (``cost_fast.htr``); σ ≤ 0 gives a fresh Adam state.
   That step updates no parameter, as the public NYUv2 trainer (``BaseStepConfig(
   step_after_teleport=True)``: a base step at the teleported point, as its CityScapes trainer);
5. otherwise the base method's update: Gram-based methods give w from M, loss weightings w from
   the losses, gradient-based ones (GradDrop, MoCo) the backbone update itself; the heads (and a
   loss weighting's learned parameters) get the gradient of the weighted total, the backbone Gᵀw;
   non-finite results there also change nothing (a gradient method's non-finite update from
   finite gradients leaves the parameters and the optimizer as they were; its own state, not
   snapshotted because it can be K x P, has taken the step). After the optimizer step a loss
   weighting learns (``LossWeighting.after_step``), as in its own training loop.
   ``BaseStepConfig`` changes that step to the public code's (unweighted heads, K·Gᵀw,
   gradient clipping).

Epochs: with ``steps_per_epoch`` (default: the length of the teleport data, when it has one)
COST counts them itself; otherwise call ``end_epoch()`` after each.

Data parallel (``process_group``, or torch.distributed's default group when it is initialized
with several ranks; ``cost_fast.distributed``): each rank passes the losses of its part of the
global batch; per-task gradients are reduce-scattered, the Gram matrix all-reduced, the update
all-gathered, the heads' gradients all-reduced, and the teleport runs in lockstep on the global
losses, so that every rank takes the same decisions and ends each step with the parameters one
process would have on the whole batch. Do not wrap the model in DDP: COST communicates itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from cost_fast import checkpoint, distributed
from cost_fast.aggregators.base import Aggregator, as_method, list_aggregators
from cost_fast.backward import Losses, add_into_grad, apply_method, gradients, stack_losses
from cost_fast.checks import all_finite, check_int
from cost_fast.grads import RepresentationGradients, TaskGradients, check_task_losses
from cost_fast.htr import HistoryReuse, flat_cosine, supports_htr
from cost_fast.kernels import GramStats
from cost_fast.lora import TeleportAdapter
from cost_fast.perturbed import LossFn
from cost_fast.rng import caller_generators_untouched
from cost_fast.semantics import Semantics, get_semantics
from cost_fast.symmetry import RescalingTeleport
from cost_fast.teleport import TeleportConfig, eval_mode, level_set_error, loss_contour, merge_verdict, teleport
from cost_fast.timing import PhaseTimer
from cost_fast.weighting.base import LossWeighting

ADAPTERS = ("lora", "loha", "rescale")
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


class COST:
    """Multi-task training step with COST teleportation (see the module docstring).

    Args:
        model: the whole multi-task model.
        shared: its shared backbone (a submodule of ``model``). Its trainable Linear/Conv layers
            get the teleport adapter, in weight space (never in the model): ``model.state_dict()``
            keeps the plain model's keys. Frozen layers are never changed.
        base: the base method: an ``Aggregator`` (``get_aggregator("fairgrad")``, ...), the
            name of one (``"fairgrad"``), a function ``gram -> weights``, or a
            ``LossWeighting`` built for the K tasks (whose learned parameters must be in
            ``optimizer``).
        optimizer: over the model's parameters; Adam/AdamW get HTR, others none (with a
            warning when teleports are on).
        loss_fn: ``loss_fn(model, batch) -> Tensor[K]``, used by the teleport; its output is
            checked on the first step (one forward pass without grad, in eval mode).
        teleport_data: re-iterable, non-empty batches for the teleport (the public code: the
            training loader). Iterating it never moves torch's global generators.
        semantics: ``"public"`` (the public code, default), ``"paper"``, or a ``Semantics``.
        teleport: ``TeleportConfig`` (default ``TeleportConfig()``; its lr defaults to the
            optimizer's first group's).
        start_step, start_epoch: no teleport before these (delayed start).
        max_teleports_per_epoch: frequency control (default 1; 0 disables teleports).
        steps_per_epoch: steps per epoch, counted by COST (default: ``len(teleport_data)``
            when it has a length; None without one: call ``end_epoch()``).
        rank: adapter rank (default 5; its alpha is the semantics'). adapter: ``"lora"``
            (default), ``"loha"``, or ``"rescale"``: no adapter, the group-action teleport of
            Zhao et al. on the backbone's hidden-unit rescalings (``cost_fast.symmetry``: exact
            loss invariance, gradient ascent on the gradient norm; MLP backbones). The adapter
            works in weight space (``cost_fast.lora``: every teleport forward is a plain
            forward at W + ΔW) and the model's modules are never swapped.
        adapter_targets: ``targets(name, layer) -> bool`` chooses the adapted layers among the
            backbone's trainable Linear/Conv ones (default: all).
        base_step: ``BaseStepConfig`` (default: the base method's own step).
        gradient_mode: ``"loop"`` or ``"batched"`` (``TaskGradients``: exact per-task gradients of
            the shared parameters), or ``"representation"`` (``RepresentationGradients``: per-task
            gradients of the backbone's output, weights from their Gram matrix; an approximation,
            much cheaper at large K).
        nonfinite: ``"skip"`` (default) or ``"raise"`` on non-finite losses or gradients.
        scaler: an AMP ``torch.amp.GradScaler``. COST then scales the losses it is given itself
            (pass the plain losses, not ``scaler.scale(losses)``), solves every method on the
            unscaled statistics (so the weights never depend on the scale), and leaves the
            scaled update in ``.grad`` for ``scaler.step``; ``step()`` calls ``scaler.step`` and
            ``scaler.update``. Non-finite gradients are the scaler's to handle: COST adds NaN
            into ``.grad`` so that the scaler skips that optimizer step and lowers its scale
            (``nonfinite="raise"`` is refused with a scaler).
        process_group: data-parallel training over this group (default: torch.distributed's
            default group when it is initialized with several ranks; module docstring).
        batch_size: ``batch_size(batch) -> int``, this rank's samples in a batch, which weight
            its losses in the global ones (default: the first dimension of the batch's first
            tensor); only used with a process group.
        seed: seed of COST's own generator (adapter factors, teleport noise), the same on every
            rank; torch's global generators are never drawn from.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module,
        base: Aggregator | LossWeighting | str | Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: LossFn,
        teleport_data: Iterable[Any],
        semantics: str | Semantics = "public",
        teleport: TeleportConfig | None = None,
        start_step: int = 0,
        start_epoch: int = 0,
        max_teleports_per_epoch: int = 1,
        steps_per_epoch: int | None = None,
        rank: int = 5,
        adapter: str = "lora",
        adapter_targets: Callable[[str, nn.Module], bool] | None = None,
        base_step: BaseStepConfig | None = None,
        gradient_mode: Literal["loop", "batched", "representation"] = "loop",
        nonfinite: Literal["skip", "raise"] = "skip",
        scaler: torch.amp.GradScaler | None = None,
        process_group: Any = None,
        batch_size: Callable[[Any], int] | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module) or not isinstance(shared, nn.Module):
            raise TypeError("model and shared must be torch.nn.Modules")
        if not any(m is shared for m in model.modules()):
            raise ValueError("shared must be a submodule of model")
        if isinstance(base, str) and list_aggregators().get(base) == "loss":
            raise ValueError(
                f"{base!r} is a loss weighting: build it for your K tasks, base = get_aggregator({base!r}, "
                "num_tasks=K), and give the optimizer its parameters too (optimizer over "
                "[*model.parameters(), *base.parameters()])"
            )
        if isinstance(base, str) or (callable(base) and not isinstance(base, nn.Module)):
            base = as_method(base)  # a method as it is, a Gram or gradient method's name, a function gram -> w
        if not isinstance(base, Aggregator | LossWeighting):
            raise TypeError(
                f"base must be an Aggregator, a LossWeighting, a method's name or a function gram -> weights, "
                f"got {type(base).__name__}"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> Tensor[K]")
        if iter(teleport_data) is teleport_data:
            raise ValueError("teleport_data must be re-iterable (a DataLoader or a list), not a one-shot iterator")
        if hasattr(teleport_data, "__len__") and len(teleport_data) == 0:
            raise ValueError("teleport_data is empty: the teleport needs at least one batch")
        for name, value in (
            ("start_step", start_step),
            ("start_epoch", start_epoch),
            ("max_teleports_per_epoch", max_teleports_per_epoch),
        ):
            check_int(name, value, 0)
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        if gradient_mode not in ("loop", "batched", "representation"):
            raise ValueError(f"gradient_mode must be 'loop', 'batched' or 'representation', got {gradient_mode!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scaler is not None and nonfinite == "raise":
            raise ValueError(
                "nonfinite='raise' cannot be used with a GradScaler: its overflows are the scaler's to skip"
            )
        if teleport is not None and not isinstance(teleport, TeleportConfig):
            raise TypeError(f"teleport must be a TeleportConfig, got {type(teleport).__name__}")
        if base_step is not None and not isinstance(base_step, BaseStepConfig):
            raise TypeError(f"base_step must be a BaseStepConfig, got {type(base_step).__name__}")
        if steps_per_epoch is None and hasattr(teleport_data, "__len__"):
            steps_per_epoch = len(teleport_data)
        check_int("steps_per_epoch", steps_per_epoch, 1, optional=True)
        shared_params = [p for p in shared.parameters() if p.requires_grad]
        if not shared_params:
            raise ValueError("every parameter of the shared backbone is frozen: COST has nothing to train or teleport")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = [p for p in model.parameters() if p.requires_grad]
        if isinstance(base, LossWeighting):
            trainable += [p for p in base.parameters() if p.requires_grad]
        missing = [p for p in trainable if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable parameters of the model or the base method are not in the optimizer "
                "(a learned loss weighting's parameters must be added: optimizer over "
                "[*model.parameters(), *base.parameters()])"
            )
        self.model, self.shared, self.base, self.optimizer = model, shared, base, optimizer
        self.loss_fn, self.teleport_data = loss_fn, teleport_data
        self.semantics = get_semantics(semantics)
        self.teleport_config = teleport if teleport is not None else TeleportConfig()
        self.base_step = base_step if base_step is not None else BaseStepConfig()
        self.start_step, self.start_epoch = start_step, start_epoch
        self.max_teleports_per_epoch = max_teleports_per_epoch
        self.steps_per_epoch = steps_per_epoch
        self.gradient_mode = gradient_mode
        self.nonfinite = nonfinite
        self.scaler = scaler
        self.group = distributed.default_group(process_group)
        self.batch_size = batch_size if batch_size is not None else _first_dimension
        if self.group is not None:
            if isinstance(base, Aggregator) and base.kind == "grads":
                raise ValueError(f"{type(base).__name__} needs every column of G: not supported with a process group")
            if gradient_mode == "representation":
                raise ValueError("gradient_mode='representation' is not supported with a process group")
            if self.teleport_config.samples_per_pass > 1:
                raise ValueError("samples_per_pass > 1 (vmapped samples) is not supported with a process group")
        self.generator = torch.Generator(device=shared_params[0].device).manual_seed(seed)
        self.symmetry = RescalingTeleport(model, shared) if adapter == "rescale" else None
        if self.symmetry is not None and self.group is not None:
            raise ValueError("the rescaling teleport is not supported with a process group")
        self.adapter = (
            None
            if self.symmetry is not None
            else TeleportAdapter(shared, rank=rank, method=adapter, generator=self.generator, targets=adapter_targets)
        )
        if self.group is not None:  # before any hook is registered: a refused COST leaves nothing behind
            learned = list(base.parameters()) if isinstance(base, LossWeighting) else []
            distributed.check_agreement(self._settings(), [*model.parameters(), *learned], self.group)
        shared_ids = {id(p) for p in shared.parameters()}
        self.task_params = [p for p in model.parameters() if id(p) not in shared_ids and p.requires_grad]
        self.learned_weighting_params = (
            [p for p in base.parameters() if p.requires_grad] if isinstance(base, LossWeighting) else []
        )
        self._shared_params = shared_params
        self._num_params = sum(p.numel() for p in shared_params)
        self.htr = HistoryReuse(optimizer) if supports_htr(optimizer) else None
        if self.htr is None and max_teleports_per_epoch > 0:
            warnings.warn(
                f"HTR is off: it modulates Adam's moments and needs Adam or AdamW, got {type(optimizer).__name__} "
                "(teleports still run)",
                UserWarning,
                stacklevel=2,
            )
        # HTR's g' in public semantics is the last base update: kept apart from the engine's buffer,
        # which a skipped step overwrites.
        self._keeps_last_update = (
            self.htr is not None and self.semantics.htr_direction == "last_update" and max_teleports_per_epoch > 0
        )
        self.engine: TaskGradients | RepresentationGradients | None = None
        if gradient_mode == "representation":  # its hook must see the first forward pass already
            self._representation_engine = RepresentationGradients(shared, shared_params)
        self._checkpoint_num_tasks: int | None = None
        self._last_update: torch.Tensor | None = None
        self._pending_learning: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self._base_epoch_due = False  # the base method's end_epoch() waits for its last learning
        self._wrote_gradients = False  # COST added to .grad since the last optimizer step
        self.step_count = 0
        self.epoch = 0
        self.teleports_this_epoch = 0
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        optimizer.register_step_post_hook(self._after_optimizer_step)

    def _settings(self) -> dict[str, str]:
        """Everything that must be the same on every rank of a process group, described."""
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "parameters": len(group["params"])}
            for group in self.optimizer.param_groups
        ]
        method = repr(self.base) if isinstance(self.base, Aggregator) else type(self.base).__name__
        return {
            "base method": method,
            "semantics": repr(self.semantics),
            "teleport config": repr(self.teleport_config),
            "base step": repr(self.base_step),
            "schedule": f"start_step={self.start_step}, start_epoch={self.start_epoch}, "
            f"max_teleports_per_epoch={self.max_teleports_per_epoch}, steps_per_epoch={self.steps_per_epoch}",
            "adapter": "rescale"
            if self.adapter is None
            else f"{self.adapter.method} rank {self.adapter.rank} on {self.adapter.names}",
            "optimizer": f"{type(self.optimizer).__name__} {groups}",
            "gradients": f"gradient_mode={self.gradient_mode}, nonfinite={self.nonfinite}, "
            f"scaler={self.scaler is not None}",
            "seed": str(self.generator.initial_seed()),
        }

    @property
    def num_tasks(self) -> int | None:
        """K: from the first step's losses, the base method (a loss weighting) or a loaded
        checkpoint; None before any of them."""
        if self.engine is not None:
            return self.engine.num_tasks
        if isinstance(self.base, LossWeighting):
            return self.base.num_tasks
        return self._checkpoint_num_tasks

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, COST's generator, the base method's state, the last update (HTR's g') and a
        pending HTR (``cost_fast.checkpoint`` lists the fields), so that with the model's and
        optimizer's state dicts a resumed run continues bit-exactly as an uninterrupted one.
        Tensors and plain values only (``torch.load(weights_only=True)`` reads it), with a
        checksum that ``load_state_dict`` verifies."""
        state = {
            "format": checkpoint.FORMAT,
            "semantics": self.semantics.name,
            "method": type(self.base).__name__,
            "num_tasks": self.num_tasks,
            "num_params": self._num_params,
            "step_count": self.step_count,
            "epoch": self.epoch,
            "teleports_this_epoch": self.teleports_this_epoch,
            "generator": self.generator.get_state(),
            "base": copy.deepcopy(self.base.state_dict()),
            "last_update": None if self._last_update is None else self._last_update.clone(),
            "htr": None if self.htr is None else self.htr.state_dict(),
        }
        state["checksum"] = checkpoint.checksum(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. The whole state is checked first (semantics,
        method, K, P, types; ``cost_fast.checkpoint.check_state``): a state that does not fit
        raises one ``ValueError`` naming what differs, and nothing is loaded."""
        state = checkpoint.upgrade(state)
        checkpoint.check_state(
            state,
            semantics=self.semantics.name,
            method=self.base,
            num_tasks=self.num_tasks,
            num_params=self._num_params,
            generator=self.generator,
            has_htr=self.htr is not None,
        )
        self.step_count = state["step_count"]
        self.epoch = state["epoch"]
        self.teleports_this_epoch = state["teleports_this_epoch"]
        self.generator.set_state(state["generator"])
        self.base.load_state_dict(state["base"])
        self._checkpoint_num_tasks = state["num_tasks"]
        last = state["last_update"]
        first = self._shared_params[0]
        self._last_update = None if last is None else last.to(device=first.device, dtype=first.dtype).clone()
        if self.htr is not None:
            self.htr.load_state_dict(state["htr"] if state["htr"] is not None else {"pending_sigma": None})

    # -- epochs --------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """Start a new epoch (frequency control, ``start_epoch``, the base method's epoch).
        Only for teleport data without a length: otherwise COST counts epochs itself."""
        if self.steps_per_epoch is not None:
            raise RuntimeError(
                f"COST counts epochs itself ({self.steps_per_epoch} steps each, from steps_per_epoch or "
                "len(teleport_data)): do not call end_epoch()"
            )
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.teleports_this_epoch = 0
        self._base_epoch_due = True
        if self._pending_learning is None:  # else after the weighting learned from the last step
            self._close_base_epoch()

    def _close_base_epoch(self) -> None:
        self._base_epoch_due = False
        if isinstance(self.base, LossWeighting):
            self.base.end_epoch()

    def _allowed(self) -> bool:
        return (
            self.step_count >= self.start_step
            and self.epoch >= self.start_epoch
            and self.teleports_this_epoch < self.max_teleports_per_epoch
        )

    # -- the step ------------------------------------------------------------------------------

    def step(self, losses: Losses, batch: Any) -> StepInfo:
        """One whole training step from the K task losses of ``batch`` (with their graph: a
        1-D tensor, a list of scalar tensors or a dict ``{task name: loss}``, whose names
        ``StepInfo.task_names`` keeps; ``loss_fn`` returns them as a tensor, in the same order), as
        ``optimizer.zero_grad(); backward(losses, batch); optimizer.step()``: it starts from
        zero gradients and, when ``backward`` left any, steps the optimizer (through
        ``scaler.step`` and ``scaler.update`` with a scaler)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._wrote_gradients = False
        info = self.backward(losses, batch)
        if self._wrote_gradients:  # a base update, or non-finite gradients for the scaler to skip
            with info.timer.phase("optimizer_step"):
                if self.scaler is None:
                    self.optimizer.step()
                else:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
        return info

    def backward(self, losses: Losses, batch: Any) -> StepInfo:
        """Everything of ``step`` but ``zero_grad`` and ``optimizer.step()``: adds the base
        update into ``.grad`` as ``loss.backward()`` does (so several calls before one optimizer
        step accumulate their micro-batches; a skipped one adds nothing), or teleports, adding
        nothing. The caller clips, scales or steps. A teleport runs only on a call that starts an
        accumulation (no gradient of COST's since the last optimizer step): in the middle of
        one it waits, as it would move the parameters the earlier micro-batches were taken at.
        A pending HTR applies to the next optimizer step. Call it outside ``torch.autocast``
        (compute the losses inside it): inside, it raises."""
        losses, task_names = stack_losses(losses)
        if torch.is_autocast_enabled(losses.device.type):
            raise RuntimeError(
                "COST.step/backward was called inside torch.autocast: compute the losses inside it, then call COST "
                "outside it (the Gram matrix, the solves and the teleport's bookkeeping need full precision); for "
                "mixed-precision teleport forward passes, use autocast inside loss_fn"
            )
        num_tasks = self.num_tasks
        check_task_losses(losses, losses.shape[0] if num_tasks is None else num_tasks)
        if self.engine is None:
            self._check_loss_fn(batch, losses.shape[0])
            self.engine = self._build_engine(losses.shape[0])
        if self._base_epoch_due:  # the optimizer step the weighting waited for never came
            self._close_base_epoch()
        self._pending_learning = None
        info = self._backward(losses, batch)  # raises before counting the step (nonfinite="raise")
        info.task_names = task_names
        self.step_count += 1
        if self.steps_per_epoch is not None and self.step_count % self.steps_per_epoch == 0:
            self._new_epoch()
        return info

    def _build_engine(self, num_tasks: int) -> TaskGradients | RepresentationGradients:
        if self.gradient_mode == "representation":
            return self._representation_engine
        if self.group is not None:
            return distributed.ShardedTaskGradients(self._shared_params, num_tasks, self.group, mode=self.gradient_mode)
        return TaskGradients(self._shared_params, num_tasks=num_tasks, mode=self.gradient_mode)

    def _check_loss_fn(self, batch: Any, num_tasks: int) -> None:
        """``loss_fn(model, batch)`` must give the K losses the step got (the teleport relies on
        it): one forward pass without grad, in eval mode, the caller's generators untouched."""
        paused = (
            self._representation_engine.capture_paused()
            if self.gradient_mode == "representation"
            else contextlib.nullcontext()
        )
        with eval_mode(self.model), torch.no_grad(), caller_generators_untouched(self.model), paused:
            out = self.loss_fn(self.model, batch)
        try:
            check_task_losses(out, num_tasks)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"loss_fn(model, batch) must return the {num_tasks} task losses, like the losses given to step(): {err}"
            ) from None

    def _loss_scale(self, like: torch.Tensor) -> torch.Tensor | None:
        """The scaler's current scale s as a device tensor (no host read), or None."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), dtype=torch.float32, device=like.device))

    def _task_gradients(
        self, local: torch.Tensor, batch: Any, timer: PhaseTimer
    ) -> tuple[torch.Tensor, GramStats, torch.Tensor | None]:
        """The global losses (this rank's own without a process group), G of the scaled losses,
        its statistics unscaled, and the scale (None without a scaler)."""
        engine = self.engine
        losses = local
        if self.group is not None:  # the global losses, the same on every rank
            losses, engine.share = distributed.global_losses(local, self.batch_size(batch), self.group)
        scale = self._loss_scale(local)
        with timer.phase("gradients"):
            engine.compute(local if scale is None else local * scale, retain_graph=True)
        with timer.phase("gram"):
            stats = engine.stats()
        return losses, stats if scale is None else stats.unscaled(scale), scale

    def _backward(self, local: torch.Tensor, batch: Any) -> StepInfo:
        timer = PhaseTimer(local.device)
        losses, stats, scale = self._task_gradients(local, batch, timer)
        with timer.phase("gram"):
            finite = torch.isfinite(losses).all() & ~stats.nonfinite
            fires = self.semantics.fires(stats) & finite
        # the host read of the decision and the statistics it reports
        dominated, pairs, min_cos, mean_norm, fired, ok = torch.stack(
            [
                stats.num_dominated.double(),
                stats.num_conflicting_pairs.double(),
                stats.cos_mean.min().double(),
                stats.mean_norm.double(),
                fires.double(),
                finite.double(),
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
            timer=timer,
        )
        if not ok:
            return self._skip(info, NONFINITE)
        accumulating = self._wrote_gradients and any(p.grad is not None for p in self._shared_params)
        if info.trigger and self._allowed() and not accumulating:
            with timer.phase("teleport"):
                self._teleport(losses, stats, scale, batch, info)
            if not self.base_step.step_after_teleport:
                return info
            # the public CityScapes trainer: a base step at the teleported point, same batch
            local = self.loss_fn(self.model, batch)
            check_task_losses(local, self.engine.num_tasks)
            losses, stats, scale = self._task_gradients(local, batch, timer)
            if not bool(torch.isfinite(losses).all() & ~stats.nonfinite):
                return self._skip(info, NONFINITE)
            info.stepped_after_teleport = True
        with timer.phase("solve"):
            refused = self._base_update(losses, stats, scale)
        if refused is not None:
            return self._skip(info, refused)
        if isinstance(self.base, LossWeighting):
            self._pending_learning = (losses.detach(), stats.norms, batch)
        return info

    def _skip(self, info: StepInfo, reason: str) -> StepInfo:
        """A step that adds nothing to ``.grad`` (with a scaler: adds NaN, for the scaler to skip
        the optimizer step and lower its scale, as it would after a plain backward)."""
        if self.nonfinite == "raise":
            if reason == NONFINITE_GRADIENT_METHOD_UPDATE:
                unchanged = "the parameters and the optimizer were not changed"
            else:
                unchanged = "nothing was changed"
            raise FloatingPointError(f"step {info.step}: {reason}; {unchanged}")
        if self.scaler is not None and self.scaler.is_enabled():
            self.engine.write_update(torch.full_like(self.engine.combined, float("nan")))
            self._wrote_gradients = True
            reason += " (handed to the GradScaler, which skips the optimizer step and lowers its scale)"
        info.skipped = reason
        return info

    def _base_update(self, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None) -> str | None:
        """Add the base update into ``.grad`` and return None; or add nothing and return why
        (``NONFINITE_UPDATE``: the weights, the update or the heads' gradients are not finite,
        the base method's state as it was; ``NONFINITE_GRADIENT_METHOD_UPDATE``: a gradient
        method's update is not finite). Everything is computed and checked before anything is
        added, so that an accumulated gradient is never spoilt."""
        heads, learned = self.task_params, self.learned_weighting_params

        def scaled(total: torch.Tensor) -> torch.Tensor:
            return total if scale is None else total * scale.to(total)

        if isinstance(self.base, Aggregator) and self.base.kind == "grads":
            # The heads' gradient (of Σ L_i) does not depend on the method, so it is checked
            # first, and the method's state (MoCo's: K x P) advances only on a step that is taken.
            head_grads, learned_grads = gradients(scaled(losses.sum()), heads), []
            self._reduce_heads(head_grads)
            if not all_finite(head_grads):
                return NONFINITE_UPDATE
            apply_method(self.base, losses, self.engine, stats.gram, scale)
            if not all_finite([self.engine.combined]):
                return NONFINITE_GRADIENT_METHOD_UPDATE
        else:
            saved = copy.deepcopy(self.base.state_dict())  # small: K-sized buffers, generators
            total, _ = apply_method(self.base, losses, self.engine, stats.gram, scale)
            if self.base_step.head_gradients == "per_task":
                head_grads = gradients(scaled(losses.sum()), heads, retain_graph=bool(learned))
                learned_grads = gradients(scaled(total), learned)
            else:
                both = gradients(scaled(total), heads + learned)
                head_grads, learned_grads = both[: len(heads)], both[len(heads) :]
            self._reduce_heads(head_grads)
            if not all_finite([self.engine.combined, *head_grads, *learned_grads]):
                self.base.load_state_dict(saved)
                return NONFINITE_UPDATE
        if self.base_step.scale_backbone_by_tasks:
            self.engine.combined.mul_(self.engine.num_tasks)
        self.engine.write_update(self.engine.combined)
        add_into_grad(heads + learned, head_grads + learned_grads)
        if self._keeps_last_update:
            if self._last_update is None:
                self._last_update = self.engine.combined.clone()
            else:
                self._last_update.copy_(self.engine.combined)
        self._wrote_gradients = True
        return None

    def _reduce_heads(self, grads: list[torch.Tensor | None]) -> None:
        """With a process group each rank holds its share of the heads' gradient: sum them."""
        if self.group is not None:
            distributed.all_reduce_(grads, self.group)

    def _global_loss_fn(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss_fn``, or with a process group the global losses (the same on every rank)."""
        losses = self.loss_fn(model, batch)
        if self.group is None:
            return losses
        return distributed.global_losses(losses, self.batch_size(batch), self.group)[0]

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Right before the optimizer step that uses COST's gradients (whoever calls it, after a
        GradScaler has unscaled them): ``BaseStepConfig.clip_grad_norm`` clips the shared
        parameters' gradient, as the public code's ``clip_grad_norm_(shared, 1.0)``."""
        clip = self.base_step.clip_grad_norm
        if clip is not None and self._wrote_gradients:
            torch.nn.utils.clip_grad_norm_([p for p in self._shared_params if p.grad is not None], clip)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After the optimizer step of a base update: the loss weighting learns from it."""
        self._wrote_gradients = False
        if self._pending_learning is None:
            return
        losses, norms, batch = self._pending_learning
        self._pending_learning = None

        def losses_after() -> torch.Tensor:
            with torch.no_grad():
                return self._global_loss_fn(self.model, batch)

        self.base.after_step(losses, grad_norms=norms, losses_after=losses_after)
        if self._base_epoch_due:
            self._close_base_epoch()

    def _teleport(
        self, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None, batch: Any, info: StepInfo
    ) -> None:
        """Teleport and report it, then HTR; the caller's generators untouched (iterating a
        shuffled DataLoader as teleport data draws from them)."""
        with caller_generators_untouched(self.model):
            g_prime = self._htr_direction(losses, stats, scale)
            if self.symmetry is not None:
                self._symmetry_teleport(batch, info, g_prime)
                return
            adapter = self.adapter
            result = teleport(
                self.model,
                adapter,
                self._global_loss_fn,
                self.teleport_data,
                batch,
                ratios=self.semantics.ratio_weights(stats.norms),
                semantics=self.semantics,
                config=self.teleport_config,
                lr=self.optimizer.param_groups[0]["lr"],
                generator=self.generator,
                reduce_gradients=None
                if self.group is None
                else lambda grads: distributed.all_reduce_(grads, self.group),
            )
        info.task_terms, info.sharpness_terms = result.task_terms, result.sharpness_terms
        info.level_set_error, info.merged_fraction = result.level_set_error, result.fraction
        self._after_teleport(
            info, result.steps, result.rollback_reason, adapter.base_parameters, result.deltas, g_prime
        )

    def _htr_direction(
        self, losses: torch.Tensor, stats: GramStats, scale: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """g' of HTR as parameter-shaped tensors, or None (no HTR, or no base update yet):
        the last base update (public semantics), or the base method's direction at the
        pre-teleport point (Eq. 12), computed without advancing the method's state."""
        if self.htr is None:
            return None
        if self.semantics.htr_direction == "pre_teleport_gradient":
            saved = copy.deepcopy(self.base.state_dict())
            apply_method(self.base, losses.detach().requires_grad_(), self.engine, stats.gram, scale)
            self.base.load_state_dict(saved)
            return self.engine.combined_views
        if self._last_update is None:
            return None
        return _parameter_views(self._last_update, self.engine.params)

    def _symmetry_teleport(self, batch: Any, info: StepInfo, g_prime: list[torch.Tensor] | None) -> None:
        """The rescaling teleport, with the same measures as the LoRA teleport: its level-set
        error, the guard (the semantics' default, or the config's), ``level_set_tolerance`` as a
        check (a rescaling has no ΔW to shrink) and the refusal of a non-finite result."""
        config = self.teleport_config
        measure = config.evaluates_after(self.semantics)
        params = self.symmetry.parameters
        snapshot = [p.detach().clone() for p in params]
        with eval_mode(self.model):
            before = loss_contour(self.model, self.loss_fn, self.teleport_data) if measure else None
            result = self.symmetry.teleport(self.loss_fn, batch)
            finite = all_finite([*params, result.losses_after])
            after = loss_contour(self.model, self.loss_fn, self.teleport_data) if measure and finite else None
        reason = None if finite else "non-finite"
        if after is not None:
            info.level_set_error = level_set_error(before, after, config.level_set_floor)
            reason = merge_verdict(config, self.semantics, before, after, info.level_set_error)
        info.merged_fraction = 1.0
        deltas = result.deltas
        if reason is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, snapshot)
            deltas = [torch.zeros_like(d) for d in deltas]
        info.symmetry = {
            "before": result.conflicts_before,
            "after": result.conflicts_after,
            "objective": result.objective,
        }
        self._after_teleport(info, result.steps, reason, params, deltas, g_prime)

    def _after_teleport(
        self,
        info: StepInfo,
        steps: int,
        reason: str | None,
        params: list[torch.Tensor],
        deltas: list[torch.Tensor],
        g_prime: list[torch.Tensor] | None,
    ) -> None:
        """Count and report the teleport, then HTR from σ = cos(Δθ, g')."""
        self.teleports_this_epoch += 1
        info.teleported = reason is None
        info.rolled_back = reason is not None
        info.rollback_reason = reason
        info.teleport_steps = steps
        if reason is not None or g_prime is None:
            return
        delta_of = {id(p): d for p, d in zip(params, deltas)}
        aligned = [delta_of[id(p)] for p in self.engine.params]
        sigma = float(flat_cosine(aligned, g_prime))
        info.sigma = sigma
        info.htr = self.htr.arm(max(-1.0, min(1.0, sigma)))


def _first_dimension(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (nested in tuples, lists or
    dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for item in items:
        try:
            return _first_dimension(item)
        except ValueError:
            continue
    raise ValueError("cannot tell the batch size: pass COST(batch_size=...)")


def _parameter_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter-shaped views of a flat (P,) vector laid out in ``params``' order."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()
    return views
