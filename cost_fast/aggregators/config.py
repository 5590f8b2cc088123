"""ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.imtl import unit_scaling
from cost_fast.registry import register


@register("config")
class ConFIG(Aggregator):
    """ConFIG: the direction v with equal positive projection on every unit task gradient,
    v = U⁺1 (U the matrix of unit gradients u_i = g_i/‖g_i‖), scaled by the total projection:

        d = (Σ_i g_iᵀv̂) v̂,   v̂ = v/‖v‖.

    In Gram terms, with N = diag(1/‖g_i‖) and c = (N M N)⁺ 1: v = Gᵀ N c, ‖v‖² = cᵀ N M N c,
    Σ_i g_iᵀv = 1ᵀ M N c, so w = (1ᵀ M N c / cᵀ N M N c) N c.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        n_inv = unit_scaling(gram)
        unit_gram = n_inv[:, None] * gram * n_inv[None, :]
        c = torch.linalg.pinv(unit_gram, hermitian=True) @ torch.ones_like(n_inv)
        nc = n_inv * c
        v_sq = c @ unit_gram @ c
        total = gram.sum(dim=0) @ nc
        return torch.where(v_sq > 0, total / v_sq.clamp_min(1e-300), torch.zeros_like(v_sq)) * nc
