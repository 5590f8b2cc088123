"""The multi-task methods by name, above both families: ``get_aggregator(name)`` builds one,
``list_aggregators()`` lists every name with its kind, ``as_method`` turns what a caller passes
as a method (an object, a name, a function ``gram -> weights``) into a method.

Kinds: ``"gram"`` (weights from the Gram matrix M = G Gᵀ, ``cost_fast.aggregators``),
``"grads"`` (an update from G itself) and ``"loss"`` (weights of the task losses,
``cost_fast.weighting``). Importing this module registers both families."""

from __future__ import annotations

from typing import Any

import torch

import cost_fast.aggregators  # noqa: F401  (registers the Gram and gradient methods)
import cost_fast.weighting  # noqa: F401  (registers the loss weightings)
from cost_fast.aggregators.base import Aggregator, WeightsFunction
from cost_fast.registry import REGISTRY
from cost_fast.weighting.base import LossWeighting

Method = Aggregator | LossWeighting


def list_aggregators() -> dict[str, str]:
    """Every registered name with its kind: "gram" (weights from M), "grads" (needs G itself)
    or "loss" (weights the task losses)."""
    return {name: cls.kind for name, cls in sorted(REGISTRY.items())}


def get_aggregator(name: str, **hparams: Any) -> Method:
    """Build the method registered as ``name`` (an ``Aggregator`` or a ``LossWeighting``) with
    its hyper-parameters, which it checks when it is built."""
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(REGISTRY))}")
    if REGISTRY[name].kind == "loss" and "num_tasks" not in hparams:
        raise ValueError(
            f"{name!r} is a loss weighting, built for a number of tasks: get_aggregator({name!r}, num_tasks=K)"
        )
    return REGISTRY[name](**hparams)


def is_stateful(method: Method) -> bool:
    """Whether ``method`` carries state from call to call: an aggregator that overrides
    ``state_dict``, or a loss weighting with parameters, buffers, extra state or an ``update``."""
    if isinstance(method, LossWeighting):
        has_tensors = any(True for _ in method.parameters()) or any(True for _ in method.buffers())
        extra = type(method).get_extra_state is not torch.nn.Module.get_extra_state
        return has_tensors or extra or bool(method.update_arguments)
    return type(method).state_dict is not Aggregator.state_dict


def as_method(method: Any, *, num_tasks: int | None = None, allow_stateful_name: bool = True) -> Method:
    """The method that ``method`` names or is: an ``Aggregator`` or a ``LossWeighting`` as it
    is; a registered name built by ``get_aggregator`` (a loss weighting with ``num_tasks``); a
    plain function ``gram -> weights`` wrapped in ``WeightsFunction``. ``num_tasks`` (K) is
    needed for the name of a loss weighting, and checked against a loss weighting given built.
    ``allow_stateful_name=False`` refuses the name of a method with state (``is_stateful``),
    for callers that would build a new one at every call."""
    if isinstance(method, Aggregator | LossWeighting):
        if isinstance(method, LossWeighting) and num_tasks is not None and method.num_tasks != num_tasks:
            raise ValueError(
                f"{type(method).__name__} was built for {method.num_tasks} tasks, the losses are {num_tasks}"
            )
        return method
    if isinstance(method, str):
        kind = list_aggregators().get(method)
        # without num_tasks, get_aggregator refuses a loss weighting's name, saying how to build it
        built = (
            get_aggregator(method, num_tasks=num_tasks)
            if kind == "loss" and num_tasks is not None
            else get_aggregator(method)
        )
        if not allow_stateful_name and is_stateful(built):
            hint = f"get_aggregator({method!r}" + (f", num_tasks={num_tasks})" if kind == "loss" else ")")
            raise ValueError(
                f"{method!r} keeps state from step to step: build it once, method = {hint}, and pass the object"
            )
        return built
    if callable(method):
        return WeightsFunction(method)
    raise TypeError(
        "method must be an Aggregator, a LossWeighting, a registered name or a function gram -> weights, "
        f"got {type(method).__name__}"
    )
