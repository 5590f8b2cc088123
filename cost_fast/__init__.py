"""cost_fast: a fast engine for gradient-based multi-task learning and COST teleportation."""

from cost_fast.aggregators import get_aggregator, list_aggregators
from cost_fast.grads import TaskGradients
from cost_fast.kernels import GramStats, gram_stats

__version__ = "0.1.0"

__all__ = ["GramStats", "TaskGradients", "__version__", "get_aggregator", "gram_stats", "list_aggregators"]
