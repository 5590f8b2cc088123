"""MGDA (Désidéri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", 2018)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.solvers import min_norm_simplex
from cost_fast.registry import register


@register("mgda")
class MGDA(Aggregator):
    """Min-norm point of the convex hull of the task gradients:

        w = argmin_{w ≥ 0, Σ w = 1} ‖Gᵀw‖² = argmin wᵀMw,    d = Gᵀw.

    Solved exactly (active set on the unit-diagonal scaling of M, see ``min_norm_simplex``),
    not by Frank–Wolfe iterations.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        return min_norm_simplex(gram)
