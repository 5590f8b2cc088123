"""COST in PyTorch Lightning: ``COSTModule``, a ``LightningModule`` trained by COST with manual
optimization (the optional extra ``pip install 'cost_fast[lightning]'``).

Per training batch, ``training_step`` does what ``COST.step`` does, with Lightning's optimizer
wrapper so that Lightning counts the step and its precision plugin steps it:

    optimizer.zero_grad()                             # at the start of an accumulation
    info = cost.backward(task_losses(batch), batch)   # outside autocast: COST needs full precision
    optimizer.step()                                  # at its end; with no gradient (a teleport) Adam changes nothing
    the LR schedulers of configure_optimizers         # "step" ones after each optimizer step, "epoch" ones at epoch ends

Manual optimization is Lightning's way for a module that steps itself, and Lightning refuses
``Trainer(gradient_clip_val=...)`` and ``Trainer(accumulate_grad_batches=...)`` with it: clip
with ``BaseStepConfig(clip_grad_norm=...)`` in ``build_cost`` and accumulate with
``COSTModule(accumulate_grad_batches=N)``. Logged per step: ``train_loss`` (the mean task
loss), each task's loss and base-method weight (``loss/<task>``, ``weight/<task>``), and the
run's counts so far (``cost/teleported``, ``cost/rolled_back``, ``cost/skipped``,
``cost/triggered``: cumulative, so that ``log_every_n_steps`` loses none).

COST is built by ``build_cost(optimizer)`` when training starts (``on_train_start``: after
Lightning has created the optimizer and restored a checkpoint, before the first batch). Its
``state_dict`` travels in Lightning's checkpoint under ``"cost_fast"``, with the global random
generators (torch's CPU one and the module's CUDA device's, Python's, NumPy's) under
``"cost_fast_rng"``, restored when the resumed fit starts: a run resumed from a checkpoint taken
at an epoch's end with ``trainer.fit(..., ckpt_path=...)`` continues bit-exactly as an
uninterrupted one, shuffled loaders included (those drawing from torch's generator; a
``DataLoader(generator=g)``'s state is the caller's). With ``precision="16-mixed"`` Lightning owns
the GradScaler: give it to COST (``scaler=self.grad_scaler``), which is checked. One device only:
for several, COST communicates itself (``docs/data_parallel.md``), which Lightning's DDP wrapping
would duplicate.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cost_fast.lightning needs PyTorch Lightning: pip install 'cost_fast[lightning]' (or lightning>=2.2)"
    ) from err

from cost_fast.backward import Losses, stack_losses
from cost_fast.checks import check_int
from cost_fast.cost import COST
from cost_fast.info import StepInfo

CHECKPOINT_KEY = "cost_fast"
RNG_KEY = "cost_fast_rng"


class COSTModule(pl.LightningModule):
    """A ``LightningModule`` whose training step is COST's (module docstring).

    Subclass it and implement ``task_losses(batch)`` (the K losses of a batch, with their
    graph: a tensor, a list or a dict ``{task name: loss}``), ``configure_optimizers()`` (one
    optimizer, with LR schedulers if you like, as usual) and ``build_cost(optimizer)`` (the
    ``COST`` over this module and that optimizer). Call ``super().__init__()`` first in
    ``__init__``. A subclass's own ``training_step`` must call ``super().training_step(batch,
    batch_idx)``: one that trains by itself (returns a loss) is refused at its first batch,
    before anything changed.

    Args:
        accumulate_grad_batches: batches per optimizer step (default 1), as Lightning's own
            option, which manual optimization refuses.

    Attributes:
        cost: the ``COST`` (None before training starts).
        last_step_info: the ``StepInfo`` of the latest training step.
    """

    def __init__(self, *, accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False  # COST owns the backward pass
        self.accumulate_grad_batches = check_int("accumulate_grad_batches", accumulate_grad_batches, 1)
        self.cost: COST | None = None
        self.last_step_info: StepInfo | None = None
        self._loaded_cost_state: dict[str, Any] | None = None
        self._loaded_rng: dict[str, Any] | None = None
        self._optimizer_steps = 0
        self._cost_stepped = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap a subclass's own ``training_step`` so that one that does not reach COST's is
        refused (class docstring) instead of training nothing without a word."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("training_step")
        if own is None:
            return

        @functools.wraps(own)
        def checked(self: COSTModule, batch: Any, batch_idx: int, *args: Any, **kw: Any) -> Any:
            self._cost_stepped = False
            out = own(self, batch, batch_idx, *args, **kw)
            if not self._cost_stepped:
                raise RuntimeError(
                    f"{cls.__name__}.training_step did not call COSTModule.training_step: with COSTModule, COST "
                    "takes the step (Lightning ignores a returned loss under manual optimization, so nothing "
                    "would train). Implement task_losses(batch) instead, or call super().training_step(batch, "
                    "batch_idx) in your training_step"
                )
            return out

        cls.training_step = checked

    def task_losses(self, batch: Any) -> Losses:
        """The K task losses of ``batch``, with their graph."""
        raise NotImplementedError(f"{type(self).__name__} must implement task_losses(batch)")

    def build_cost(self, optimizer: torch.optim.Optimizer) -> COST:
        """The ``COST`` that trains this module with ``optimizer`` (the plain torch optimizer
        Lightning created from ``configure_optimizers``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_cost(optimizer)")

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Lightning's GradScaler (``precision="16-mixed"``), which COST must be given, or None."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def on_train_start(self) -> None:
        """Build COST (once per optimizer), apply a checkpoint's COST state and put back its
        random generators, before any batch."""
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"COSTModule trains on one device (this trainer has {self.trainer.world_size}): for several, "
                "run COST's own data parallel under torchrun (docs/data_parallel.md)"
            )
        optimizer = self._torch_optimizer()
        if self.cost is None or self.cost.optimizer is not optimizer:
            carried = self._loaded_cost_state  # a checkpoint's, else the state of the COST built for an earlier fit
            if carried is None and self.cost is not None:
                carried = self.cost.state_dict()
            cost = self.build_cost(optimizer)
            if not isinstance(cost, COST):
                raise TypeError(f"build_cost must return a COST, got {type(cost).__name__}")
            if cost.model is not self:
                raise ValueError("build_cost must build COST over this module (COST(self, ...))")
            if cost.optimizer is not optimizer:
                raise ValueError("build_cost must build COST over the optimizer it is given")
            if cost.scaler is not self.grad_scaler:
                raise ValueError(
                    "COST must get Lightning's GradScaler (COST(..., scaler=self.grad_scaler)): with "
                    f"precision={self.trainer.precision!r} Lightning steps the optimizer through "
                    f"{'it' if self.grad_scaler is not None else 'no scaler'}"
                )
            if carried is not None:
                cost.load_state_dict(carried)
            self.cost, self._loaded_cost_state = cost, None
        if self._loaded_rng is not None:
            _set_rng(self._loaded_rng, self.device)
            self._loaded_rng = None
            # The resumed epoch's data iterator was made before this hook; in the uninterrupted
            # run it drew its base seed from the generator as saved, just before the shuffle:
            # draw it again, so that the shuffle draws from the state the uninterrupted one did.
            torch.empty((), dtype=torch.int64).random_()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """COST's step on ``batch`` (module docstring); logs the losses, weights and counts."""
        self._cost_stepped = True
        optimizer = self.optimizers()
        n = self.accumulate_grad_batches
        if batch_idx % n == 0:
            optimizer.zero_grad()
        losses = self.task_losses(batch)
        # The losses may come from autocast (precision="bf16-mixed"); COST itself runs outside it.
        with torch.autocast(self.device.type, enabled=False):
            info = self.cost.backward(losses, batch)
        if (batch_idx + 1) % n == 0 or batch_idx + 1 == self.trainer.num_training_batches:
            optimizer.step()
            self._optimizer_steps += 1
            self._step_schedulers("step", self._optimizer_steps)
        self.last_step_info = info
        self._log_step(losses, info, batch_idx)

    def on_train_epoch_end(self) -> None:
        """The LR schedulers of interval "epoch"."""
        self._step_schedulers("epoch", self.current_epoch + 1)

    def _step_schedulers(self, interval: str, count: int) -> None:
        """Step the LR schedulers of ``interval`` whose frequency divides ``count`` (a
        ReduceLROnPlateau with the metric it monitors, which must have been logged)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % config.frequency:
                continue
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor)
                if metric is None:
                    raise RuntimeError(
                        f"the LR scheduler monitors {config.monitor!r}, which was not logged: log it, or monitor "
                        f"one of {sorted(self.trainer.callback_metrics)}"
                    )
                config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def _log_step(self, losses: Losses, info: StepInfo, batch_idx: int) -> None:
        names = info.task_names or tuple(f"task_{i}" for i in range(len(info.losses)))
        self.log("train_loss", stack_losses(losses)[0].detach().mean(), prog_bar=True)
        for name, value in zip(names, info.losses):
            self.log(f"loss/{name}", value)
        if batch_idx % self.trainer.log_every_n_steps == 0 and info.weights is not None:  # one host read
            for name, value in zip(names, info.weights):
                self.log(f"weight/{name}", value)
        counts = self.cost.tally.summary()
        for key in ("teleported", "rolled_back", "skipped", "triggered"):
            self.log(f"cost/{key}", float(counts[key]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """COST's state and the global random generators into Lightning's checkpoint."""
        state = self.cost.state_dict() if self.cost is not None else self._loaded_cost_state
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state
        checkpoint[RNG_KEY] = _get_rng(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep COST's state and the generators until training starts (Lightning restores
        before it creates optimizers)."""
        self._loaded_cost_state = checkpoint.get(CHECKPOINT_KEY)
        self._loaded_rng = checkpoint.get(RNG_KEY)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        optimizers = self.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"COSTModule needs exactly one optimizer from configure_optimizers, got {len(optimizers)}")
        return optimizers[0]


def _get_rng(device: torch.device) -> dict[str, Any]:
    """The global generators' states as plain values (NumPy's, if NumPy is there)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def _set_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
