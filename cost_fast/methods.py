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


def torchjd_weighting(method: Any) -> Any:
    """The Gram-matrix weighting of a torchjd object, a function ``gram -> weights`` (None for
    an object that is not torchjd's): a ``GramianWeightedAggregator`` (``UPGrad()``, ``MGDA()``,
    ...) gives its ``gramian_weighting``, a Gramian weighting (``UPGradWeighting()``) is one.
    torchjd's aggregators compute Gᵀw from G itself with the same w, so the update is theirs.
    ``TypeError`` for a torchjd object that needs the Jacobian itself, or that keeps state (which
    COST's checkpoint could not hold), naming the cost_fast method to use instead."""
    kind = type(method)
    if not kind.__module__.startswith("torchjd"):
        return None
    bases = {c.__name__ for c in kind.__mro__}
    ours = _registered_like(kind.__name__)
    instead = f"get_aggregator({ours!r})" if ours else "a cost_fast method (list_aggregators())"
    if "Stateful" in bases:
        raise TypeError(f"torchjd's {kind.__name__} keeps state that COST's checkpoint cannot hold: use {instead}")
    if "GramianWeightedAggregator" in bases:
        return method.gramian_weighting
    if "_GramianWeighting" in bases:
        return method
    raise TypeError(f"torchjd's {kind.__name__} works on the Jacobian itself, not on its Gram matrix: use {instead}")


def _registered_like(name: str) -> str | None:
    """The registered name that ``name`` (a class name, e.g. torchjd's ``IMTLG``) spells, if any."""
    plain = "".join(ch for ch in name.lower().removesuffix("weighting") if ch.isalnum())
    matches = [n for n in REGISTRY if n.replace("_", "") == plain]
    return matches[0] if matches else None


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
    plain function ``gram -> weights`` wrapped in ``WeightsFunction``; a torchjd object that
    weights the Gram matrix (``torchjd_weighting``). ``num_tasks`` (K) is needed for the name of
    a loss weighting, and checked against a loss weighting given built.
    ``allow_stateful_name=False`` refuses the name of a method with state (``is_stateful``),
    for callers that would build a new one at every call. Any other ``torch.nn.Module`` is
    refused: a module's call is not known to map a Gram matrix to weights."""
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
    weighting = torchjd_weighting(method)
    if weighting is not None:
        return WeightsFunction(weighting)
    if isinstance(method, torch.nn.Module):
        raise TypeError(
            f"{type(method).__name__} is a torch.nn.Module, not a cost_fast method or a function gram -> weights: "
            "pass a method (get_aggregator(name); list_aggregators() lists them), or a function, e.g. "
            "lambda gram: module(gram), if the module maps the K x K Gram matrix to K weights"
        )
    if callable(method):
        return WeightsFunction(method)
    raise TypeError(
        "method must be an Aggregator, a LossWeighting, a registered name or a function gram -> weights, "
        f"got {type(method).__name__}"
    )
