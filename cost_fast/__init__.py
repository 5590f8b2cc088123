"""cost_fast: a fast engine for gradient-based multi-task learning and COST teleportation.

The names below are imported when first used (``cost_fast.COST`` imports ``cost_fast.cost``, and
so torch), so that ``import cost_fast`` and the ``cost-fast`` command start at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Every public name: the module it lives in.
_EXPORTS = {
    "Aggregator": "cost_fast.aggregators",
    "GradientAggregator": "cost_fast.aggregators",
    "BackwardResult": "cost_fast.backward",
    "mtl_backward": "cost_fast.backward",
    "COST": "cost_fast.cost",
    "DataParallelConfig": "cost_fast.distributed",
    "GradientEngine": "cost_fast.grads",
    "TaskGradients": "cost_fast.grads",
    "StepInfo": "cost_fast.info",
    "GramStats": "cost_fast.kernels",
    "gram_stats": "cost_fast.kernels",
    "get_aggregator": "cost_fast.methods",
    "list_aggregators": "cost_fast.methods",
    "register": "cost_fast.registry",
    "BaseStepConfig": "cost_fast.step",
    "AdapterConfig": "cost_fast.teleport",
    "PaperSemantics": "cost_fast.teleport",
    "PublicSemantics": "cost_fast.teleport",
    "RescaleConfig": "cost_fast.teleport",
    "Semantics": "cost_fast.teleport",
    "TeleportConfig": "cost_fast.teleport",
    "TeleportSchedule": "cost_fast.teleport",
    "get_semantics": "cost_fast.teleport",
    "LossWeighting": "cost_fast.weighting",
}

__all__ = [
    "COST",
    "AdapterConfig",
    "Aggregator",
    "BackwardResult",
    "BaseStepConfig",
    "DataParallelConfig",
    "GradientAggregator",
    "GradientEngine",
    "GramStats",
    "LossWeighting",
    "PaperSemantics",
    "PublicSemantics",
    "RescaleConfig",
    "Semantics",
    "StepInfo",
    "TaskGradients",
    "TeleportConfig",
    "TeleportSchedule",
    "__version__",
    "get_aggregator",
    "get_semantics",
    "gram_stats",
    "list_aggregators",
    "mtl_backward",
    "register",
]


def __getattr__(name: str) -> Any:
    """The public ``name`` from its module, imported on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cost_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
