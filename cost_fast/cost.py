"""``COST``: a drop-in multi-task step with COST's teleport, assembled from its parts.

Each step computes the per-task gradients of the shared backbone and their Gram statistics, then
decides (one host read): skip it (non-finite losses or gradients), teleport (the semantics'
trigger fired and the schedule allows it; then HTR), or take the base method's update (the same
as ``mtl_backward``'s). The parts, each with its config, its state and what it registers:

    cost_fast.step                 BaseStep (BaseStepConfig): the update, the skip, clipping, a
                                   loss weighting's learning; optimizer hooks
    cost_fast.teleport.schedule    Clock (TeleportSchedule): steps, epochs, when a teleport may run
    cost_fast.teleport.teleporter  Teleporter (TeleportConfig, AdapterConfig/RescaleConfig)
    cost_fast.teleport.htr         HistoryReuse: Adam's history after a teleport; optimizer hooks
    cost_fast.info                 Tally: what the run has done; cost_fast.distributed: Ranks

``close()`` (or ``with COST(...) as cost:``) removes what COST registered; a new COST over an
optimizer that a live one holds closes the earlier one (``cost_fast.claim``), so hooks never stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cost_fast import checkpoint
from cost_fast.arguments import (
    check_arguments,
    check_loss_fn,
    check_optimizer_holds,
    check_outside_autocast,
    describe_settings,
    htr_is_on,
    resolve_base,
    resolve_configs,
    tensor_losses,
    trainable_shared,
)
from cost_fast.backward import Losses, stack_losses
from cost_fast.claim import OptimizerClaim
from cost_fast.distributed import DataParallelConfig, Ranks
from cost_fast.grads import GradientEngine, RepresentationGradients, check_task_losses
from cost_fast.info import StepInfo, Tally
from cost_fast.methods import Method
from cost_fast.split_grads import OutputCapture
from cost_fast.step import BaseStep, BaseStepConfig
from cost_fast.teleport.config import AdapterConfig, RescaleConfig, TeleportConfig
from cost_fast.teleport.data import TeleportData
from cost_fast.teleport.htr import HistoryReuse
from cost_fast.teleport.schedule import Clock, TeleportSchedule
from cost_fast.teleport.semantics import Semantics, get_semantics
from cost_fast.teleport.teleporter import Teleporter
from cost_fast.timing import PhaseTimer
from cost_fast.update import NONFINITE
from cost_fast.weighting.base import LossWeighting

__all__ = ["COST"]


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
        loss_fn: ``loss_fn(model, batch)``, the K task losses of a batch as ``step`` takes them
            (a tensor, a list or a dict), used by the teleport; checked on the first step (one
            forward pass without grad, in eval mode).
        teleport_data: re-iterable, non-empty batches for the teleport (the public code: the
            training loader). Iterating it never moves torch's global generators.
        semantics: ``"public"`` (the public code, default), ``"paper"``, or a ``Semantics``.
        schedule: ``TeleportSchedule`` (start, teleports per epoch, steps per epoch; default
            its defaults: from the first step, once per epoch of ``len(teleport_data)`` steps).
        teleport: ``TeleportConfig`` (default its defaults; its lr defaults to the optimizer's
            first group's).
        adapter: ``AdapterConfig`` (LoRA or LoHa, its rank and target layers), ``RescaleConfig``
            (no adapter: the group-action teleport of Zhao et al. on the backbone's hidden-unit
            rescalings, ``cost_fast.teleport.rescaling``; MLP backbones), or the short names
            ``"lora"`` (default), ``"loha"``, ``"rescale"``.
        base_step: ``BaseStepConfig`` (the ordinary step, the gradient mode, the non-finite
            policy; default: the base method's own step).
        htr: HTR after a merged teleport (default True; Adam and AdamW only).
        scaler: an AMP ``torch.amp.GradScaler``: pass the plain losses; COST scales them, solves
            every method on unscaled statistics and leaves the scaled update for ``scaler.step``
            (``step()`` calls ``scaler.step`` and ``scaler.update``); an overflow is handed to the
            scaler as NaN, so that it skips the step and lowers its scale.
        data_parallel: ``DataParallelConfig`` (default: torch.distributed's default group when
            it is initialized with several ranks; ``cost_fast.distributed``).
        seed: seed of COST's own generator (adapter factors, teleport noise), the same on every
            rank; torch's global generators are never drawn from.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module,
        base: Method | str | Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable[[nn.Module, Any], Losses],
        teleport_data: Iterable[Any],
        semantics: str | Semantics = "public",
        schedule: TeleportSchedule | None = None,
        teleport: TeleportConfig | None = None,
        adapter: str | AdapterConfig | RescaleConfig = "lora",
        base_step: BaseStepConfig | None = None,
        htr: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        data_parallel: DataParallelConfig | None = None,
        seed: int = 0,
    ) -> None:
        base = resolve_base(base)
        check_arguments(model, shared, optimizer, loss_fn, teleport_data, scaler, seed, htr)
        schedule, teleport, step, adapter = resolve_configs(schedule, teleport, base_step, adapter, teleport_data)
        if scaler is not None and step.nonfinite == "raise":
            raise ValueError(
                "nonfinite='raise' cannot be used with a GradScaler: its overflows are the scaler's to skip"
            )
        shared_params = trainable_shared(shared)
        check_optimizer_holds(model, base, optimizer)
        self.ranks = ranks = Ranks(data_parallel)
        ranks.refuse_unsupported(
            gradient_method=type(base).__name__ if getattr(base, "kind", None) == "grads" else None,
            representation=step.gradient_mode == "representation",
            teleport=teleport,
            rescaling=isinstance(adapter, RescaleConfig),
        )
        self.model, self.shared, self.base, self.optimizer, self.scaler = model, shared, base, optimizer, scaler
        self.semantics = get_semantics(semantics)
        self.teleport_config, self.teleport_data = teleport, TeleportData(teleport_data)
        self._given_loss_fn = loss_fn
        self.loss_fn = tensor_losses(loss_fn)
        self._global_loss_fn = ranks.global_loss_fn(self.loss_fn)  # the teleport's, a weighting's after a step
        self._shared_params = shared_params
        self._num_params = sum(p.numel() for p in shared_params)
        self._checkpoint_num_tasks: int | None = None
        self.clock = Clock(schedule)
        self.tally = Tally()
        self.engine: GradientEngine | None = None
        self.htr: HistoryReuse | None = None
        self._claim = OptimizerClaim(optimizer)
        shared_ids = {id(p) for p in shared.parameters()}
        self.base_step = BaseStep(
            base,
            step,
            model=model,
            loss_fn=self._global_loss_fn,
            heads=[p for p in model.parameters() if id(p) not in shared_ids and p.requires_grad],
            shared=shared_params,
            sum_over_ranks=ranks.sum_over_ranks,
            scaler=scaler,
        )
        self._representation_engine: RepresentationGradients | None = None
        self._capture: OutputCapture | None = None  # the backbone's output, for split_at_output
        try:
            if htr_is_on(htr, optimizer, schedule):
                keeps = self.semantics.htr_direction == "last_update" and schedule.max_per_epoch > 0
                self.htr = HistoryReuse(optimizer, params=shared_params, keeps_last_update=keeps)
            self.teleporter = Teleporter(
                model,
                shared,
                adapter=adapter,
                loss_fn=self.loss_fn,
                global_loss_fn=self._global_loss_fn,
                teleport_data=self.teleport_data,
                semantics=self.semantics,
                config=teleport,
                optimizer=optimizer,
                method=base,
                htr=self.htr,
                seed=seed,
                sum_over_ranks=ranks.sum_over_ranks if ranks.parallel else None,
            )
            self._agreed_tensors = [*model.parameters(), *self.base_step.learned]
            self._seed = seed
            ranks.check_agreement(describe_settings(self, seed), self._agreed_tensors)
            self.base_step.attach(optimizer)
            if step.gradient_mode == "representation":  # its hook must see the first forward pass already
                self._representation_engine = RepresentationGradients(shared, shared_params)
            elif step.split_at_output and not ranks.parallel:  # so must this one
                self._capture = OutputCapture(shared)
        except BaseException:
            self._release()
            raise
        self._claim.take([part.close for part in self._hooked_parts()])

    # -- what COST is made of --------------------------------------------------------------------

    @property
    def adapter(self) -> Any:
        """The teleport's ``TeleportAdapter`` (None for the rescaling teleport)."""
        return self.teleporter.adapter

    step_count = property(lambda self: self.clock.step_count, doc="Steps taken (``Clock``).")
    epoch = property(lambda self: self.clock.epoch, doc="The current epoch (``Clock``).")
    teleports_this_epoch = property(lambda self: self.clock.teleports_this_epoch, doc="Teleports run this epoch.")

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
    def closed(self) -> bool:
        """``close()`` was called, or a newer COST over the same optimizer closed this one."""
        return self._claim.closed

    def close(self) -> None:
        """Remove what COST registered (its optimizer hooks, HTR's, the representation hook) and
        drop a pending HTR; the COST can no longer step. Closing twice does nothing."""
        self._release()

    def _hooked_parts(self) -> list[Any]:
        """The parts that registered hooks (on the optimizer, or the backbone's forward)."""
        return [p for p in (self.htr, self.base_step, self._representation_engine, self._capture) if p is not None]

    def _release(self) -> None:
        for part in self._hooked_parts():
            part.close()
        self._claim.release()

    def __enter__(self) -> COST:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The header and each part's state (``cost_fast.checkpoint`` lists the fields), so that
        with the model's and optimizer's state dicts a resumed run continues bit-exactly as an
        uninterrupted one. Tensors and plain values only (``torch.load(weights_only=True)``
        reads it), with a checksum that ``load_state_dict`` verifies."""
        parts = {name: None if part is None else part.state_dict() for name, part in self._parts().items()}
        return checkpoint.make_state(**self._header(), **parts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned. The whole state is checked first (format and
        checksum, then the header and every part's state, ``cost_fast.checkpoint``): a state
        that does not fit raises one ``ValueError`` naming what differs, and nothing is loaded."""
        checkpoint.load_into(state, header=self._header(), parts=self._parts())
        self._checkpoint_num_tasks = state["num_tasks"]
        self.ranks.loaded()

    def _header(self) -> dict[str, Any]:
        return {
            "semantics": self.semantics.name,
            "method": type(self.base).__name__,
            "num_tasks": self.num_tasks,
            "num_params": self._num_params,
        }

    def _parts(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "tally": self.tally,
            "teleporter": self.teleporter,
            "htr": self.htr,
            "base": self.base_step,
        }

    # -- epochs --------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """Start a new epoch (frequency control, ``start_epoch``, the base method's epoch).
        Only for teleport data without a length: otherwise COST counts epochs itself."""
        steps = self.clock.schedule.steps_per_epoch
        if steps is not None:
            raise RuntimeError(
                f"COST counts epochs itself ({steps} steps each, from TeleportSchedule.steps_per_epoch or "
                "len(teleport_data)): do not call end_epoch()"
            )
        self._new_epoch()

    def _new_epoch(self) -> None:
        schedule, epoch = self.clock.schedule, self.clock.epoch
        allowed = epoch >= schedule.start_epoch and schedule.max_per_epoch > 0
        self.tally.new_epoch(epoch, teleports_allowed=allowed, semantics=self.semantics.name)
        self.clock.new_epoch()
        self.base_step.new_epoch()

    # -- the step ------------------------------------------------------------------------------

    def step(self, losses: Losses, batch: Any) -> StepInfo:
        """One whole training step from the K task losses of ``batch`` (with their graph: a
        1-D tensor, a list of scalar tensors or a dict ``{task name: loss}``, whose names
        ``StepInfo.task_names`` keeps), as ``optimizer.zero_grad(); backward(losses, batch);
        optimizer.step()``: it starts from zero gradients and, when ``backward`` left any, steps
        the optimizer (through ``scaler.step`` and ``scaler.update`` with a scaler)."""
        self._refuse_closed()
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
        nothing. The caller clips, scales or steps. A teleport waits for a call that starts an
        accumulation (``cost_fast.teleport.schedule``). A pending HTR applies to the next
        optimizer step. Call it outside ``torch.autocast`` (compute the losses inside it):
        inside, it raises."""
        self._refuse_closed()
        losses, task_names = stack_losses(losses)
        check_outside_autocast(losses)
        num_tasks = self.num_tasks
        check_task_losses(losses, losses.shape[0] if num_tasks is None else num_tasks)
        if self.engine is None:
            check_loss_fn(self.model, self._given_loss_fn, batch, losses.shape[0], self._representation_engine)
            self.engine = self._representation_engine or self.ranks.task_gradients(
                self._shared_params, losses.shape[0], self.base_step.config.gradient_mode, self._capture
            )
        self.base_step.begin()
        info = self._backward(losses, batch)  # raises before counting the step (nonfinite="raise")
        info.task_names = task_names
        self.tally.record(info)
        if self.clock.tick():
            self._new_epoch()
        return info

    def _refuse_closed(self) -> None:
        if self.closed:
            raise RuntimeError("this COST is closed (close(), or a newer COST took its optimizer): build a new one")

    def _task_gradients(self, local: torch.Tensor, batch: Any, timer: PhaseTimer) -> tuple[Any, Any, Any]:
        """The global losses (this rank's own without a process group), G of the scaled losses,
        its statistics unscaled, and the GradScaler's scale s as a device tensor (no host read;
        None without a scaler)."""
        losses, share = self.ranks.global_losses(local, batch)
        scale = None
        if self.scaler is not None:
            scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=local.device))
        with timer.phase("gradients"):
            self.engine.compute(local if scale is None else local * scale, retain_graph=True, share=share)
        with timer.phase("gram"):
            stats = self.engine.stats()
        return losses, stats if scale is None else stats.unscaled(scale), scale

    def _backward(self, local: torch.Tensor, batch: Any) -> StepInfo:
        """The step's decision: skip (non-finite), teleport, or the base update."""
        self.ranks.check_still_agree(
            self._agreed_tensors,
            lambda: {**describe_settings(self, self._seed), "state": self.state_dict()["checksum"]},
        )
        timer = PhaseTimer(local.device)
        losses, stats, scale = self._task_gradients(local, batch, timer)
        with timer.phase("gram"):
            finite = torch.isfinite(losses).all() & ~stats.nonfinite
            fires = self.semantics.fires(stats) & finite
        info = StepInfo.read(
            self.clock.step_count, self.clock.epoch, stats, losses, fires=fires, finite=finite, timer=timer
        )
        if info.skipped is not None:
            return self.base_step.skip(self.engine, info, info.skipped)
        accumulating = self.base_step.wrote_gradients and any(p.grad is not None for p in self._shared_params)
        if info.trigger and self.clock.allows_teleport(accumulating=accumulating):
            with timer.phase("teleport"), OutputCapture.paused_if(self._capture):  # not the next step's output
                self.teleporter.run(self.engine, losses, stats, scale, batch, info)
            self.clock.count_teleport()
            if not self.base_step.config.step_after_teleport:
                return info
            # the public CityScapes trainer: a base step at the teleported point, same batch
            local = self.loss_fn(self.model, batch)
            check_task_losses(local, self.engine.num_tasks)
            losses, stats, scale = self._task_gradients(local, batch, timer)
            if not bool(torch.isfinite(losses).all() & ~stats.nonfinite):
                return self.base_step.skip(self.engine, info, NONFINITE)
            info.stepped_after_teleport = True
        with timer.phase("solve"):  # on the host's copies of this step's decision (none after a teleport)
            known = (None, None) if info.stepped_after_teleport else (info.host_gram, info.host_losses)
            update = self.base_step.update(self.engine, losses, stats, scale, batch, *known)
        if isinstance(update, str):
            return self.base_step.skip(self.engine, info, update)
        info.keep_weights(update.weights)
        if self.htr is not None:
            self.htr.record_update(self.engine.combined)
        return info
