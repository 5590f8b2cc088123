"""``COST``'s arguments, checked and resolved before anything is built: each check names what is
wrong and how to mend it, so that a refused COST has done no work and registered nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cost_fast.backward import Losses, stack_losses
from cost_fast.grads import RepresentationGradients, check_task_losses
from cost_fast.methods import Method, as_method, list_aggregators
from cost_fast.rng import caller_generators_untouched
from cost_fast.step import BaseStepConfig
from cost_fast.teleport.config import AdapterConfig, RescaleConfig, TeleportConfig, adapter_config
from cost_fast.teleport.contour import eval_mode
from cost_fast.teleport.htr import supports_htr
from cost_fast.teleport.perturbed import LossFn
from cost_fast.teleport.schedule import TeleportSchedule
from cost_fast.weighting.base import LossWeighting


def resolve_base(base: Any) -> Method:
    """The base method from what ``COST`` was given (a loss weighting's name is refused: COST
    cannot know K before the first step, nor add parameters to the caller's optimizer)."""
    if isinstance(base, str) and list_aggregators().get(base) == "loss":
        raise ValueError(
            f"{base!r} is a loss weighting: build it for your K tasks, base = get_aggregator({base!r}, "
            "num_tasks=K), and give the optimizer its parameters too (optimizer over "
            "[*model.parameters(), *base.parameters()])"
        )
    if isinstance(base, str) or (callable(base) and not isinstance(base, Method)):
        base = as_method(base)  # a Gram or gradient method's name, a function gram -> w, a torchjd weighting
    if not isinstance(base, Method):
        raise TypeError(
            f"base must be an Aggregator, a LossWeighting, a method's name or a function gram -> weights, "
            f"got {type(base).__name__}"
        )
    return base


def resolve_config(name: str, value: Any, kind: type) -> Any:
    """``value``, or ``kind()`` for None; ``TypeError`` for anything but a ``kind``."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def resolve_configs(
    schedule: Any, teleport: Any, base_step: Any, adapter: Any, teleport_data: Any
) -> tuple[TeleportSchedule, TeleportConfig, BaseStepConfig, AdapterConfig | RescaleConfig]:
    """COST's configs from what it was given (None: the defaults); an epoch is
    ``len(teleport_data)`` steps unless the schedule says (and the data has a length)."""
    schedule = resolve_config("schedule", schedule, TeleportSchedule)
    if schedule.steps_per_epoch is None and hasattr(teleport_data, "__len__"):
        schedule = dataclasses.replace(schedule, steps_per_epoch=len(teleport_data))
    teleport = resolve_config("teleport", teleport, TeleportConfig)
    return schedule, teleport, resolve_config("base_step", base_step, BaseStepConfig), adapter_config(adapter)


def trainable_shared(shared: nn.Module) -> list[torch.Tensor]:
    """The backbone's trainable parameters; ``ValueError`` when it has none."""
    params = [p for p in shared.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter of the shared backbone is frozen: COST has nothing to train or teleport")
    return params


def htr_is_on(htr: bool, optimizer: torch.optim.Optimizer, schedule: TeleportSchedule) -> bool:
    """HTR runs when asked for and the optimizer is Adam or AdamW; a ``UserWarning`` says when it
    is asked for, teleports are on, and the optimizer is another one."""
    if htr and not supports_htr(optimizer) and schedule.max_per_epoch > 0:
        warnings.warn(
            f"HTR is off: it modulates Adam's moments and needs Adam or AdamW, got {type(optimizer).__name__} "
            "(teleports still run)",
            UserWarning,
            stacklevel=3,
        )
    return htr and supports_htr(optimizer)


def check_arguments(
    model: Any, shared: Any, optimizer: Any, loss_fn: Any, teleport_data: Any, scaler: Any, seed: Any, htr: Any
) -> None:
    """The checks of ``COST``'s arguments that need nothing built, each naming what is wrong."""
    if not isinstance(model, nn.Module) or not isinstance(shared, nn.Module):
        raise TypeError("model and shared must be torch.nn.Modules")
    if not any(m is shared for m in model.modules()):
        raise ValueError("shared must be a submodule of model")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> the K task losses")
    if iter(teleport_data) is teleport_data:
        raise ValueError("teleport_data must be re-iterable (a DataLoader or a list), not a one-shot iterator")
    if hasattr(teleport_data, "__len__") and len(teleport_data) == 0:
        raise ValueError("teleport_data is empty: the teleport needs at least one batch")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not isinstance(htr, bool):
        raise ValueError(f"htr must be True or False, got {htr!r}")


def check_optimizer_holds(model: nn.Module, base: Method, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter of the model and of a learned loss weighting is in the optimizer."""
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


def as_tensor(losses: Any) -> Any:
    """The K losses as one (K,) tensor when they come as a list or a dict (``stack_losses``);
    anything else as it is, for ``check_task_losses`` to judge."""
    return stack_losses(losses)[0] if isinstance(losses, list | tuple | dict) else losses


def tensor_losses(loss_fn: Callable[[nn.Module, Any], Losses]) -> LossFn:
    """``loss_fn`` giving the K losses as one (K,) tensor, whichever form it returns them in (a
    tensor, a list of scalar tensors or a dict, as ``step`` takes them)."""
    return lambda model, batch: as_tensor(loss_fn(model, batch))


def check_outside_autocast(losses: torch.Tensor) -> None:
    """``RuntimeError`` inside ``torch.autocast`` on the losses' device: COST's Gram matrix, its
    solves and the teleport's bookkeeping need full precision."""
    if torch.is_autocast_enabled(losses.device.type):
        raise RuntimeError(
            "COST.step/backward was called inside torch.autocast: compute the losses inside it, then call COST "
            "outside it (the Gram matrix, the solves and the teleport's bookkeeping need full precision); for "
            "mixed-precision teleport forward passes, use autocast inside loss_fn"
        )


def check_loss_fn(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Losses],
    batch: Any,
    num_tasks: int,
    representation: RepresentationGradients | None,
) -> None:
    """``loss_fn(model, batch)`` must give the K losses the first step got (the teleport relies
    on it): one forward pass without grad, in eval mode, the caller's generators untouched, and
    the captured representation of ``representation`` (if given) left as it was."""
    paused = representation.capture_paused() if representation is not None else contextlib.nullcontext()
    with eval_mode(model), torch.no_grad(), caller_generators_untouched(model), paused:
        out = loss_fn(model, batch)
    try:
        check_task_losses(as_tensor(out), num_tasks)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loss_fn(model, batch) must return the {num_tasks} task losses, like the losses given to step(): {err}"
        ) from None


def describe_settings(cost: Any, seed: int) -> dict[str, str]:
    """Everything of a COST that must be the same on every rank of a process group, described
    (for ``Ranks.check_agreement``)."""
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "parameters": len(group["params"])}
        for group in cost.optimizer.param_groups
    ]
    method = type(cost.base).__name__ if isinstance(cost.base, LossWeighting) else repr(cost.base)
    return {
        "base method": method,
        "semantics": repr(cost.semantics),
        "teleport config": repr(cost.teleport_config),
        "base step": repr(cost.base_step.config),
        "schedule": repr(cost.clock.schedule),
        "adapter": cost.teleporter.describe(),
        "optimizer": f"{type(cost.optimizer).__name__} {groups}",
        "gradients": f"scaler={cost.scaler is not None}, htr={cost.htr is not None}",
        "seed": str(seed),
    }
