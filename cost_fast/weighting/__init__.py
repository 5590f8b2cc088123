"""Loss-based multi-task weightings (``kind = "loss"`` in ``list_aggregators()``)."""

from cost_fast.weighting.base import LossWeighting
from cost_fast.weighting.methods import DWA, FAMO, GLS, IMTLL, RLW, STCH, UW, GradNorm, ScaleInvariant

__all__ = ["DWA", "FAMO", "GLS", "IMTLL", "RLW", "STCH", "UW", "GradNorm", "LossWeighting", "ScaleInvariant"]
