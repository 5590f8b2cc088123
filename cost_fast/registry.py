"""The names of the multi-task methods: ``register`` puts a method class under a name.

The registry sits below both families of methods (the aggregators, which weight or combine the
task gradients, and the loss weightings), which register themselves here as they are defined;
looking a name up (``get_aggregator``, ``list_aggregators``) is ``cost_fast.methods``, above
both families."""

from __future__ import annotations

from collections.abc import Callable

REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a method (aggregator or loss weighting) reachable as
    ``get_aggregator(name)``; ``cls.name`` becomes ``name``. A name is registered once."""

    def add(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"aggregator name {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add
