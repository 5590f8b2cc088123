"""COST in PyTorch Lightning: ``COSTModule``, a ``LightningModule`` trained by COST with manual
optimization (the optional extra ``pip install 'cost_fast[lightning]'``).

Per training batch, ``training_step`` does what ``COST.step`` does, with Lightning's optimizer
wrapper so that Lightning counts the step and its precision plugin steps it:

    optimizer.zero_grad()
    info = cost.backward(task_losses(batch), batch)   # outside autocast: COST needs full precision
    optimizer.step()                                  # with no gradient (a teleport) Adam changes nothing

COST is built by ``build_cost(optimizer)`` when training starts (``on_train_start``: after
Lightning has created the optimizer and restored a checkpoint, before the first batch), and its
``state_dict`` travels in Lightning's checkpoint under ``"cost_fast"``, so a run resumed with
``trainer.fit(..., ckpt_path=...)`` continues as an uninterrupted one. With ``precision="16-mixed"``
Lightning owns the GradScaler: give it to COST (``scaler=self.grad_scaler``), which is checked.
One device only: for several, COST communicates itself (``docs/data_parallel.md``), which
Lightning's DDP wrapping would duplicate.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cost_fast.lightning needs PyTorch Lightning: pip install 'cost_fast[lightning]' (or lightning>=2.2)"
    ) from err

from cost_fast.backward import Losses, stack_losses
from cost_fast.cost import COST
from cost_fast.info import StepInfo

CHECKPOINT_KEY = "cost_fast"


class COSTModule(pl.LightningModule):
    """A ``LightningModule`` whose training step is COST's (module docstring).

    Subclass it and implement ``task_losses(batch)`` (the K losses of a batch, with their
    graph: a tensor, a list or a dict ``{task name: loss}``), ``configure_optimizers()`` (one
    optimizer, as usual) and ``build_cost(optimizer)`` (the ``COST`` over this module and that
    optimizer). Call ``super().__init__()`` first in ``__init__``.

    Attributes:
        cost: the ``COST`` (None before training starts).
        last_step_info: the ``StepInfo`` of the latest training step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # COST owns the backward pass
        self.cost: COST | None = None
        self.last_step_info: StepInfo | None = None
        self._loaded_cost_state: dict[str, Any] | None = None

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
        """Build COST (once per optimizer) and apply a checkpoint's COST state, before any batch."""
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"COSTModule trains on one device (this trainer has {self.trainer.world_size}): for several, "
                "run COST's own data parallel under torchrun (docs/data_parallel.md)"
            )
        optimizer = self._torch_optimizer()
        if self.cost is not None and self.cost.optimizer is optimizer:
            return
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

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """COST's step on ``batch`` (module docstring); logs the mean task loss and teleports."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        losses = self.task_losses(batch)
        # The losses may come from autocast (precision="bf16-mixed"); COST itself runs outside it.
        with torch.autocast(self.device.type, enabled=False):
            info = self.cost.backward(losses, batch)
        optimizer.step()
        self.last_step_info = info
        self.log("train_loss", stack_losses(losses)[0].detach().mean(), prog_bar=True)
        self.log("teleported", float(info.teleported))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """COST's state into Lightning's checkpoint (beside the model's and optimizer's)."""
        state = self.cost.state_dict() if self.cost is not None else self._loaded_cost_state
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep COST's state until COST is built (Lightning restores before it creates optimizers)."""
        self._loaded_cost_state = checkpoint.get(CHECKPOINT_KEY)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        optimizers = self.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"COSTModule needs exactly one optimizer from configure_optimizers, got {len(optimizers)}")
        return optimizers[0]
