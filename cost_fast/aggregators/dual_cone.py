"""UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

Both project onto the dual cone of the task gradients, C = {x : Gx ≥ 0} (directions that
increase no task loss to first order). The projection of Gᵀu onto C is Gᵀ(u + v) with
v = argmin_{v ≥ 0} ½ vᵀMv + vᵀMu (the dual of min ‖x - Gᵀu‖² s.t. Gx ≥ 0), so both are
computed from M alone.
"""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.solvers import nonnegative_qp, unit_diagonal_scaling
from cost_fast.registry import register


def project_to_dual_cone(gram: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Weights u + v of the projections of Gᵀu onto {x : Gx ≥ 0}, for each row u of U (n x K);
    the n dual QPs are solved together, exactly, on the unit-diagonal scaling of M."""
    s = unit_diagonal_scaling(gram)
    scaled = s[:, None] * gram * s[None, :]
    V = nonnegative_qp(scaled, (U @ gram) * s) * s
    return U + V


@register("upgrad")
class UPGrad(Aggregator):
    """UPGrad: the mean of the projections of every task gradient onto the dual cone,

        d = (1/K) Σ_i π_C(g_i),   w = (1/K) Σ_i (e_i + v_i).

    Since C is convex and each π_C(g_i) ∈ C, d ∈ C: g_jᵀd ≥ 0 for every task j.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        return project_to_dual_cone(gram, torch.eye(K, dtype=gram.dtype, device=gram.device)).mean(dim=0)


@register("dualproj")
class DualProj(Aggregator):
    """DualProj: the projection of the mean gradient onto the dual cone, d = π_C(g0)."""

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        return project_to_dual_cone(gram, torch.full((1, K), 1.0 / K, dtype=gram.dtype, device=gram.device))[0]
