"""Nash-MTL and FairGrad: weights from the fixed point M w = w^(-1/α)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.solvers import power_fixed_point
from cost_fast.checks import check_positive
from cost_fast.registry import register


@register("nash_mtl")
class NashMTL(Aggregator):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022):

        w > 0 with  M w = 1/w  (elementwise, M = G Gᵀ),    d = Gᵀw,

    the Nash bargaining solution: every task's directional derivative is g_iᵀd = 1/w_i.
    Solved by damped Newton on a strictly convex potential (``power_fixed_point``) instead of
    the paper's CCCP sequence of cvxpy problems. The paper's optional update-norm cap and
    "solve every N steps" are left to the caller.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        return power_fixed_point(gram, 1.0)


@register("fairgrad")
class FairGrad(Aggregator):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024):

        w > 0 with  M w = w^(-1/α),    d = Gᵀw,

    α-fair allocation of the utilities g_iᵀd = w_i^(-1/α). α = 1 (the default) is Nash-MTL:
    the same equation, so the same weights and training run. α → ∞ tends to max-min fairness,
    α → 0 to linear scalarization. Solved by damped Newton
    (``power_fixed_point``) instead of scipy ``least_squares``.

    Args:
        alpha: α > 0 (default 1.0).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = check_positive("alpha", alpha)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        return power_fixed_point(gram, self.alpha)
