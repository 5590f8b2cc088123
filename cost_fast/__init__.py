"""cost_fast: a fast engine for gradient-based multi-task learning and COST teleportation."""

from cost_fast.aggregators import Aggregator, GradientAggregator
from cost_fast.backward import BackwardResult, mtl_backward
from cost_fast.cost import COST
from cost_fast.distributed import DataParallelConfig
from cost_fast.grads import GradientEngine, TaskGradients
from cost_fast.info import StepInfo
from cost_fast.kernels import GramStats, gram_stats
from cost_fast.methods import get_aggregator, list_aggregators
from cost_fast.registry import register
from cost_fast.step import BaseStepConfig
from cost_fast.teleport import (
    AdapterConfig,
    PaperSemantics,
    PublicSemantics,
    RescaleConfig,
    Semantics,
    TeleportConfig,
    TeleportSchedule,
    get_semantics,
)
from cost_fast.weighting import LossWeighting

__version__ = "0.1.0"

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
