"""ConicGrad (Hassanpour et al., "Fantastic Multi-Task Gradient Updates and How to Find Them In a Cone", 2025)."""

from __future__ import annotations

import math

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.solvers import minimize_on_simplex
from cost_fast.checks import check_rate
from cost_fast.registry import register


def cap_support(a: torch.Tensor, v_sq: torch.Tensor, c: float) -> torch.Tensor:
    """σ(v) = max_{‖d‖ ≤ 1, dᵀĝ0 ≥ c} vᵀd from a = vᵀĝ0 and ‖v‖²:
    ‖v‖ if v lies in the cone (a ≥ c‖v‖), else c·a + sqrt(1-c²)·‖v - aĝ0‖ (boundary circle)."""
    norm = v_sq.clamp_min(0).sqrt()
    perp = (v_sq - a * a).clamp_min(0).sqrt()
    return torch.where(a >= c * norm, norm, c * a + math.sqrt(1 - c * c) * perp)


@register("conicgrad")
class ConicGrad(Aggregator):
    """ConicGrad: the update direction that maximizes the worst task improvement inside a cone
    around the mean gradient g0 (angular constraint instead of CAGrad's ball):

        d̂ = argmax_{‖d‖ ≤ 1, cos(d, g0) ≥ c} min_i g_iᵀd,     d = ‖g0‖ d̂.

    By minimax duality, d̂ maximizes vᵀd over the cone cap for v = Gᵀw*, where
    w* = argmin_{w ∈ simplex} σ(Gᵀw) and σ is the cap's support function (``cap_support``);
    everything is computed from M. We implement this definition as stated in the paper's
    summary (cone of half-angle arccos(c) around g0, max-min objective); the norm ‖g0‖ of the
    update is our choice.

    Args:
        c: cosine threshold 0 ≤ c < 1 (default 0.5; larger is a narrower cone).
    """

    def __init__(self, c: float = 0.5) -> None:
        self.c = check_rate("c", c)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        mean = torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
        scale = gram.diagonal().mean()
        M = gram / torch.where(scale > 0, scale, torch.ones_like(scale))
        g0_norm = (M.sum() / K**2).clamp_min(0).sqrt()
        if not bool(g0_norm > 1e-12):  # g0 = 0: no cone to align with; the mean (zero) update
            return mean
        b = M.sum(dim=1) / (K * g0_norm)  # b_j = g_jᵀĝ0, so a(w) = wᵀb
        c, s = self.c, math.sqrt(1 - self.c**2)

        def objective(W: torch.Tensor) -> torch.Tensor:
            return cap_support(W @ b, ((W @ M) * W).sum(-1), c)

        def gradient(w: torch.Tensor) -> torch.Tensor:
            a, Mw = w @ b, M @ w
            v_sq = w @ Mw
            inside = a >= c * v_sq.clamp_min(0).sqrt()
            perp = (v_sq - a * a).clamp_min(1e-300).sqrt()
            return torch.where(inside, Mw / v_sq.clamp_min(1e-300).sqrt(), c * b + s * (Mw - a * b) / perp)

        w = minimize_on_simplex(objective, gradient, mean)
        a = w @ b
        v_sq = w @ M @ w
        v_norm = v_sq.clamp_min(1e-300).sqrt()
        perp = (v_sq - a * a).clamp_min(1e-300).sqrt()
        # d̂ as coefficients over G: inside the cone v/‖v‖, else c ĝ0 + s (v - a ĝ0)/‖v⊥‖
        inside_coef = w / v_norm
        cap_coef = (c - s * a / perp) * mean / g0_norm + s * w / perp
        direction = torch.where(a >= c * v_norm, inside_coef, cap_coef)
        # v = 0 (e.g. a zero gradient): every cone direction reaches the optimum 0; take its axis
        direction = torch.where(v_norm > 1e-12, direction, mean / g0_norm)
        # In the scaled metric (M/scale, i.e. G/sqrt(scale)) Gᵀ·direction has norm sqrt(scale), so
        # multiplying by the scaled ‖g0‖ gives ‖d‖ = ‖g0‖ in the original units.
        return direction * g0_norm
