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

Where each part lives: the ordinary step (update, skip, clipping, a loss weighting's learning)
in ``cost_fast.step``; the teleport's coordination (schedule, adapter or rescaling teleport,
HTR) in ``cost_fast.teleporter``; the state a checkpoint holds in ``cost_fast.checkpoint``; the
data-parallel plumbing in ``cost_fast.distributed`` (``Ranks``). This module checks the
arguments, builds those parts, and takes each step's decision.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from cost_fast import checkpoint
from cost_fast.aggregators.base import Aggregator, as_method, list_aggregators
from cost_fast.backward import Losses, stack_losses
from cost_fast.checks import check_int
from cost_fast.distributed import Ranks
from cost_fast.grads import RepresentationGradients, TaskGradients, check_task_losses
from cost_fast.htr import HistoryReuse, supports_htr
from cost_fast.kernels import GramStats
from cost_fast.lora import TeleportAdapter
from cost_fast.perturbed import LossFn
from cost_fast.rng import caller_generators_untouched
from cost_fast.semantics import Semantics, get_semantics
from cost_fast.step import NONFINITE, BaseStep, BaseStepConfig, StepInfo
from cost_fast.symmetry import RescalingTeleport
from cost_fast.teleport import TeleportConfig, eval_mode
from cost_fast.teleporter import Teleporter, TeleportSchedule
from cost_fast.timing import PhaseTimer
from cost_fast.weighting.base import LossWeighting

__all__ = ["COST", "BaseStepConfig", "StepInfo"]

ADAPTERS = ("lora", "loha", "rescale")


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
        ranks = Ranks(process_group, batch_size)
        teleport_config = teleport if teleport is not None else TeleportConfig()
        ranks.refuse_unsupported(
            gradient_method=type(base).__name__ if isinstance(base, Aggregator) and base.kind == "grads" else None,
            representation=gradient_mode == "representation",
            vmapped_samples=teleport_config.samples_per_pass > 1,
            rescaling=adapter == "rescale",
        )
        self.model, self.shared, self.base, self.optimizer = model, shared, base, optimizer
        self.loss_fn, self.teleport_data = loss_fn, teleport_data
        self.semantics = get_semantics(semantics)
        self.teleport_config = teleport_config
        self.steps_per_epoch = steps_per_epoch
        self.gradient_mode = gradient_mode
        self.scaler = scaler
        self.ranks = ranks
        self._global_loss_fn = ranks.global_loss_fn(loss_fn)  # the teleport's, and a weighting's after a step
        self.generator = torch.Generator(device=shared_params[0].device).manual_seed(seed)
        symmetry = RescalingTeleport(model, shared) if adapter == "rescale" else None
        self.adapter = (
            None
            if symmetry is not None
            else TeleportAdapter(shared, rank=rank, method=adapter, generator=self.generator, targets=adapter_targets)
        )
        shared_ids = {id(p) for p in shared.parameters()}
        self.base_step = BaseStep(
            base,
            base_step if base_step is not None else BaseStepConfig(),
            heads=[p for p in model.parameters() if id(p) not in shared_ids and p.requires_grad],
            shared=shared_params,
            sum_over_ranks=ranks.sum_,
            nonfinite=nonfinite,
            scaler=scaler,
        )
        self.schedule = TeleportSchedule(start_step, start_epoch, max_teleports_per_epoch)
        # before any hook is registered (HTR's, COST's): a refused COST leaves nothing behind
        ranks.check_agreement(self._settings(), [*model.parameters(), *self.base_step.learned])
        self.htr = HistoryReuse(optimizer) if supports_htr(optimizer) else None
        self.teleporter = Teleporter(
            model,
            adapter=self.adapter,
            symmetry=symmetry,
            loss_fn=loss_fn,
            global_loss_fn=self._global_loss_fn,
            teleport_data=teleport_data,
            semantics=self.semantics,
            config=teleport_config,
            optimizer=optimizer,
            method=base,
            htr=self.htr,
            generator=self.generator,
            sum_gradients=ranks.sum_gradients(),
            schedule=self.schedule,
        )
        self._shared_params = shared_params
        self._num_params = sum(p.numel() for p in shared_params)
        if self.htr is None and max_teleports_per_epoch > 0:
            warnings.warn(
                f"HTR is off: it modulates Adam's moments and needs Adam or AdamW, got {type(optimizer).__name__} "
                "(teleports still run)",
                UserWarning,
                stacklevel=2,
            )
        self.engine: TaskGradients | RepresentationGradients | None = None
        if gradient_mode == "representation":  # its hook must see the first forward pass already
            self._representation_engine = RepresentationGradients(shared, shared_params)
        self._checkpoint_num_tasks: int | None = None
        self.step_count = 0
        self.epoch = 0
        optimizer.register_step_pre_hook(lambda *_: self.base_step.before_optimizer_step())
        optimizer.register_step_post_hook(lambda *_: self._after_optimizer_step())

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
            "base step": repr(self.base_step.config),
            "schedule": f"{self.schedule}, steps_per_epoch={self.steps_per_epoch}",
            "adapter": "rescale"
            if self.adapter is None
            else f"{self.adapter.method} rank {self.adapter.rank} on {self.adapter.names}",
            "optimizer": f"{type(self.optimizer).__name__} {groups}",
            "gradients": f"gradient_mode={self.gradient_mode}, nonfinite={self.base_step.nonfinite}, "
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

    @property
    def teleports_this_epoch(self) -> int:
        """Teleports run (merged or rolled back) in the current epoch."""
        return self.teleporter.teleports_this_epoch

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters, COST's generator, the base method's state, the last update (HTR's g') and a
        pending HTR (``cost_fast.checkpoint`` lists the fields), so that with the model's and
        optimizer's state dicts a resumed run continues bit-exactly as an uninterrupted one.
        Tensors and plain values only (``torch.load(weights_only=True)`` reads it), with a
        checksum that ``load_state_dict`` verifies."""
        last = self.teleporter.last_update
        return checkpoint.make_state(
            semantics=self.semantics.name,
            method=type(self.base).__name__,
            num_tasks=self.num_tasks,
            num_params=self._num_params,
            step_count=self.step_count,
            epoch=self.epoch,
            teleports_this_epoch=self.teleporter.teleports_this_epoch,
            generator=self.generator.get_state(),
            base=copy.deepcopy(self.base.state_dict()),
            last_update=None if last is None else last.clone(),
            htr=None if self.htr is None else self.htr.state_dict(),
        )

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
        self.teleporter.teleports_this_epoch = state["teleports_this_epoch"]
        self.generator.set_state(state["generator"])
        self.base.load_state_dict(state["base"])
        self._checkpoint_num_tasks = state["num_tasks"]
        last = state["last_update"]
        first = self._shared_params[0]
        self.teleporter.last_update = None if last is None else last.to(device=first.device, dtype=first.dtype).clone()
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
        self.teleporter.new_epoch()
        self.base_step.new_epoch()

    # -- the step ------------------------------------------------------------------------------

    def step(self, losses: Losses, batch: Any) -> StepInfo:
        """One whole training step from the K task losses of ``batch`` (with their graph: a
        1-D tensor, a list of scalar tensors or a dict ``{task name: loss}``, whose names
        ``StepInfo.task_names`` keeps; ``loss_fn`` returns them as a tensor, in the same order), as
        ``optimizer.zero_grad(); backward(losses, batch); optimizer.step()``: it starts from
        zero gradients and, when ``backward`` left any, steps the optimizer (through
        ``scaler.step`` and ``scaler.update`` with a scaler)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.base_step.wrote_gradients = False
        info = self.backward(losses, batch)
        if self.base_step.wrote_gradients:  # a base update, or non-finite gradients for the scaler to skip
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
        self.base_step.begin()
        info = self._backward(losses, batch)  # raises before counting the step (nonfinite="raise")
        info.task_names = task_names
        self.step_count += 1
        if self.steps_per_epoch is not None and self.step_count % self.steps_per_epoch == 0:
            self._new_epoch()
        return info

    def _build_engine(self, num_tasks: int) -> TaskGradients | RepresentationGradients:
        if self.gradient_mode == "representation":
            return self._representation_engine
        return self.ranks.task_gradients(self._shared_params, num_tasks, self.gradient_mode)

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

    def _task_gradients(
        self, local: torch.Tensor, batch: Any, timer: PhaseTimer
    ) -> tuple[torch.Tensor, GramStats, torch.Tensor | None]:
        """The global losses (this rank's own without a process group), G of the scaled losses,
        its statistics unscaled, and the GradScaler's scale s as a device tensor (no host read;
        None without a scaler)."""
        losses = self.ranks.global_losses(local, batch, self.engine)
        scale = None
        if self.scaler is not None:
            scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=local.device))
        with timer.phase("gradients"):
            self.engine.compute(local if scale is None else local * scale, retain_graph=True)
        with timer.phase("gram"):
            stats = self.engine.stats()
        return losses, stats if scale is None else stats.unscaled(scale), scale

    def _backward(self, local: torch.Tensor, batch: Any) -> StepInfo:
        """The step's decision: skip (non-finite), teleport, or the base update."""
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
            return self.base_step.skip(self.engine, info, NONFINITE)
        accumulating = self.base_step.wrote_gradients and any(p.grad is not None for p in self._shared_params)
        if info.trigger and self.teleporter.allowed(self.step_count, self.epoch) and not accumulating:
            with timer.phase("teleport"):
                self.teleporter.run(self.engine, losses, stats, scale, batch, info)
            if not self.base_step.config.step_after_teleport:
                return info
            # the public CityScapes trainer: a base step at the teleported point, same batch
            local = self.loss_fn(self.model, batch)
            check_task_losses(local, self.engine.num_tasks)
            losses, stats, scale = self._task_gradients(local, batch, timer)
            if not bool(torch.isfinite(losses).all() & ~stats.nonfinite):
                return self.base_step.skip(self.engine, info, NONFINITE)
            info.stepped_after_teleport = True
        with timer.phase("solve"):
            refused = self.base_step.update(self.engine, losses, stats, scale, batch)
        if refused is not None:
            return self.base_step.skip(self.engine, info, refused)
        self.teleporter.record_update(self.engine.combined)
        return info

    def _after_optimizer_step(self) -> None:
        """After the optimizer step of a base update (whoever calls it): the loss weighting
        learns from the step's losses at the new parameters (global ones across ranks)."""

        def losses_after(batch: Any) -> torch.Tensor:
            with torch.no_grad():
                return self._global_loss_fn(self.model, batch)

        self.base_step.after_optimizer_step(losses_after)
