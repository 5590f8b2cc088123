"""PCD: priority-constrained descent (Varam et al., "Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cost_fast.aggregators.base import Aggregator, clone_or_none
from cost_fast.aggregators.solvers import nonnegative_qp
from cost_fast.checks import check_nonnegative, check_rate
from cost_fast.registry import register

# A constraint counts as met when violated by at most this share of the largest normalized
# squared norm (the normalized Gram matrix has a diagonal near 1).
FEASIBILITY_TOL = 1e-6


@register("pcd")
class PCD(Aggregator):
    """Follow the primary task's gradient as closely as possible while every secondary task
    keeps a share τ of the progress its own normalized gradient would give. Task 0 is the
    primary objective, tasks 1..K-1 the secondary ones:

        d̃ = argmin_d ½ ‖d − g̃_0‖²   s.t.   g̃_jᵀ d ≥ τ_j ‖g̃_j‖²  (j ≥ 1),     d = d̃ ‖g_0‖ / ‖d̃‖,

    with normalized gradients g̃_i = s_i g_i, s_i = (v̂_i + ε)^(-1/2), v̂ the bias-corrected
    moving average of ‖g_i‖² (v ← β v + (1 − β) ‖g_i‖², v̂ = v / (1 − β^t) at call t). Solved
    exactly through its dual on the normalized Gram matrix M̃ = diag(s) M diag(s):

        μ = argmin_{μ ≥ 0} ½ μᵀ M̃_SS μ + μᵀ (M̃_S0 − τ ∘ diag M̃_SS),   d̃ = g̃_0 + Σ_j μ_j g̃_j,

    so w_0 = s_0 c, w_j = μ_j s_j c with c = ‖g_0‖ / ‖d̃‖. When the constraints cannot all hold
    (K ≥ 3, e.g. two opposite secondary gradients) d = g_0; when g_0 = 0 or d̃ = 0, d = 0.
    The moving average is the state (``state_dict``); a secondary row scaled by the same
    constant at every call leaves d unchanged (up to ε).

    Args:
        tau: τ ∈ [0, 1], one number for every secondary task or one per secondary task
            (default 0.02). beta: decay β ∈ [0, 1) of the moving average (default 0.999).
        eps: ε ≥ 0 (default 1e-8).
    """

    def __init__(self, tau: float | Sequence[float] = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        taus = torch.as_tensor(tau, dtype=torch.float64)
        if taus.ndim > 1 or not bool(((taus >= 0) & (taus <= 1)).all()):
            raise ValueError(f"tau must be a number or a vector of numbers in [0, 1], got {tau!r}")
        self.tau = taus
        self.beta = check_rate("beta", beta)
        self.eps = check_nonnegative("eps", eps)
        self.sq_norm_average: torch.Tensor | None = None  # v, float64 (K,), on the Gram matrix's device
        self.steps = 0

    def _scales(self, sq_norms: torch.Tensor) -> torch.Tensor:
        """Advance the moving average with ‖g_i‖² and return s = (v̂ + ε)^(-1/2) (0 where v̂ + ε = 0)."""
        K = sq_norms.shape[0]
        if self.sq_norm_average is None:
            self.sq_norm_average = torch.zeros_like(sq_norms)
        elif self.sq_norm_average.shape[0] != K:
            raise ValueError(f"PCD was used with K = {self.sq_norm_average.shape[0]} tasks, now K = {K}")
        average = self.beta * self.sq_norm_average.to(sq_norms) + (1 - self.beta) * sq_norms
        self.sq_norm_average = average
        self.steps += 1
        denominators = average / (1 - self.beta**self.steps) + self.eps
        return torch.where(denominators > 0, denominators.rsqrt(), torch.zeros_like(denominators))

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        taus = self.tau.to(gram.device).expand(K - 1) if self.tau.ndim == 0 else self.tau.to(gram.device)
        if taus.shape[0] != K - 1:
            raise ValueError(f"PCD has {taus.shape[0]} values of tau, the Gram matrix {K - 1} secondary tasks")
        sq_norms = gram.diagonal().clamp_min(0)
        s = self._scales(sq_norms)
        w = torch.zeros(K, dtype=gram.dtype, device=gram.device)
        if not sq_norms[0] > 0:
            return w
        normalized = s[:, None] * gram * s[None, :]
        coefficients = torch.zeros(K, dtype=gram.dtype, device=gram.device)
        coefficients[0] = 1.0
        if K > 1:
            secondary = normalized[1:, 1:]
            linear = normalized[1:, 0] - taus * secondary.diagonal()
            mu = nonnegative_qp(secondary, linear[None, :])[0]
            slack = normalized[1:, 0] + secondary @ mu - taus * secondary.diagonal()
            scale = normalized.diagonal().max()
            if bool(torch.isfinite(mu).all()) and bool((slack >= -FEASIBILITY_TOL * scale).all()):
                coefficients[1:] = mu
            # else the constraints are infeasible: d̃ = g̃_0
        sq_norm_direction = coefficients @ normalized @ coefficients
        magnitude = (coefficients.abs() @ normalized.diagonal().sqrt()) ** 2
        if not sq_norm_direction > 1e-12 * magnitude:  # d̃ = 0 up to the Gram matrix's rounding
            return w
        return coefficients * s * (sq_norms[0] / sq_norm_direction).sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {"sq_norm_average": clone_or_none(self.sq_norm_average), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sq_norm_average = clone_or_none(state["sq_norm_average"])
        self.steps = int(state["steps"])
