"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator, check_nonnegative, register
from cost_fast.aggregators.solvers import minimize_on_simplex


def cagrad_dual_weights(M: torch.Tensor, c: float) -> torch.Tensor:
    """w* = argmin_{w ∈ simplex} F(w),  F(w) = wᵀb + sqrt(φ) ‖Gᵀw‖,  b = M1/K,  φ = c²‖g0‖².

    M is first scaled by its mean diagonal (w* is invariant to that scale); then
    ``minimize_on_simplex`` from w = 1/K, with ∇F = b + sqrt(φ) Mw/‖Gᵀw‖.
    """
    K = M.shape[0]
    scale = M.diagonal().mean()
    M = M / torch.where(scale > 0, scale, torch.ones_like(scale))
    b = M.sum(dim=1) / K
    sqrt_phi = c * (b.sum() / K).clamp_min(0).sqrt()

    def objective(W: torch.Tensor) -> torch.Tensor:
        return W @ b + sqrt_phi * ((W @ M) * W).sum(-1).clamp_min(0).sqrt()

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return b + sqrt_phi * (M @ w) / (w @ M @ w).clamp_min(1e-300).sqrt()

    w0 = torch.full((K,), 1.0 / K, dtype=M.dtype, device=M.device)
    return minimize_on_simplex(objective, gradient, w0)


@register("cagrad")
class CAGrad(Aggregator):
    """CAGrad: the update maximizing the worst local improvement within a ball around g0,

        max_d min_i g_iᵀd   s.t.  ‖d - g0‖ ≤ c‖g0‖,

    through its dual: w* = argmin_{w ∈ simplex} wᵀG g0 + c‖g0‖ ‖Gᵀw‖, then
    d = g0 + (c‖g0‖ / ‖Gᵀw*‖) Gᵀw*, so the weights are 1/K + (c‖g0‖/‖Gᵀw*‖) w*, divided by
    (1 + c²) if ``rescale == 1`` or by (1 + c) if ``rescale == 2`` (as in the paper's code).

    Args:
        c: radius ratio c ≥ 0 (default 0.5; c = 0 is the mean gradient).
        rescale: 0, 1 (default) or 2.
    """

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        self.c = check_nonnegative("c", c)
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = rescale

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        mean = torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
        if self.c == 0:
            return mean
        w = cagrad_dual_weights(gram, self.c)
        g0_norm = (gram.sum() / K**2).clamp_min(0).sqrt()
        gw_norm = (w @ gram @ w).clamp_min(0).sqrt()
        coef = torch.where(gw_norm > 0, self.c * g0_norm / gw_norm.clamp_min(1e-300), torch.zeros_like(gw_norm))
        weights = mean + coef * w
        if self.rescale == 1:
            weights = weights / (1 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1 + self.c)
        return weights
