"""The loss-weighting interface: methods that weight the task losses, not their gradients.

A ``LossWeighting`` is an ``nn.Module``: ``forward(losses)`` returns the scalar training loss
(differentiable, so learned weightings such as UW get gradients for their parameters), and
``weights(losses)`` the effective task weights w_i = ∂total/∂L_i, which can drive
``TaskGradients.combine`` (d = Gᵀw). Methods that learn from what happened after a step
expose ``update(...)``; its arguments are method-specific and documented per class, and
``after_step(...)`` calls it with what any training loop has at hand (COST calls it after every
optimizer step it weighted), as ``end_epoch()`` closes an epoch. Learned parameters (UW,
IMTL-L) learn through the optimizer: add ``method.parameters()`` to it. Everything a method
learns is a buffer or parameter, so ``state_dict()`` holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from cost_fast import host
from cost_fast.checks import check_int
from cost_fast.grads import check_task_losses


class LossWeighting(nn.Module):
    """Base class. Subclasses implement ``total(losses)``.

    Args:
        num_tasks: K ≥ 1.
    """

    name = ""
    kind = "loss"
    needs_positive_losses = False
    # What ``after_step`` passes to ``update``, in order: "losses", "grad_norms", "losses_after".
    update_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = check_int("num_tasks", num_tasks, 1)

    def check_losses(self, losses: torch.Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` naming what is wrong with the losses."""
        check_task_losses(losses, self.num_tasks)
        self.check_values(losses.detach())

    def check_values(self, values: torch.Tensor) -> None:
        """The checks of the losses' values (``check_losses`` less the shape and dtype): where
        COST already holds them on the host, it checks them there, with no device read."""
        if self.needs_positive_losses and not bool((values > 0).all()):
            raise ValueError(f"{type(self).__name__} takes logarithms: every loss must be > 0, got {values.tolist()}")

    def total_of_known(self, losses: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``forward(losses)`` with the value checks made on ``values``, the losses' host copy."""
        check_task_losses(losses, self.num_tasks)
        with host.section():
            self.check_values(values)
        return self.total(losses)

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar training loss (see the class docstring for its formula)."""
        self.check_losses(losses)
        return self.total(losses)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Effective task weights w_i = ∂total/∂L_i at ``losses`` (detached; learned
        parameters receive no gradient from this call)."""
        self.check_losses(losses)
        with torch.enable_grad():
            point = losses.detach().clone().requires_grad_(True)
            (w,) = torch.autograd.grad(self.total(point), point)
        return w.detach()

    def update(self, *args, **kwargs) -> None:
        """Learn from the step just taken (no-op unless the method says otherwise)."""

    def after_step(
        self, losses: torch.Tensor, *, grad_norms: torch.Tensor, losses_after: Callable[[], torch.Tensor]
    ) -> None:
        """Learn from the optimizer step this method just weighted: ``losses`` are the step's
        task losses, ``grad_norms`` the norms ‖∇_θ L_i‖ of their gradients on the shared
        parameters, ``losses_after()`` the same batch's losses at the new parameters (computed
        only when called). Calls ``update`` with the ``update_arguments`` the method names
        (nothing for methods without any)."""
        available = {"losses": lambda: losses, "grad_norms": lambda: grad_norms, "losses_after": losses_after}
        if self.update_arguments:
            self.update(*(available[name]() for name in self.update_arguments))

    def end_epoch(self) -> None:
        """Close an epoch (default: nothing)."""
