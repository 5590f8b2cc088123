"""cost_fast: a fast engine for gradient-based multi-task learning and COST teleportation."""

from cost_fast.aggregators import Aggregator, GradientAggregator, get_aggregator, list_aggregators, register
from cost_fast.backward import BackwardResult, mtl_backward
from cost_fast.cost import COST
from cost_fast.grads import TaskGradients
from cost_fast.kernels import GramStats, gram_stats
from cost_fast.semantics import PaperSemantics, PublicSemantics, Semantics, get_semantics
from cost_fast.step import BaseStepConfig, StepInfo
from cost_fast.teleport import TeleportConfig
from cost_fast.weighting import LossWeighting

__version__ = "0.1.0"

__all__ = [
    "COST",
    "Aggregator",
    "BackwardResult",
    "GradientAggregator",
    "LossWeighting",
    "BaseStepConfig",
    "GramStats",
    "PaperSemantics",
    "PublicSemantics",
    "Semantics",
    "StepInfo",
    "TaskGradients",
    "TeleportConfig",
    "__version__",
    "get_aggregator",
    "get_semantics",
    "gram_stats",
    "list_aggregators",
    "mtl_backward",
    "register",
]
