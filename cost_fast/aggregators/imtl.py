"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.registry import register


def unit_scaling(gram: torch.Tensor) -> torch.Tensor:
    """1/‖g_i‖ from the Gram diagonal, 0 for a zero gradient (its unit vector is taken as 0)."""
    d = gram.diagonal()
    return torch.where(d > 0, d.clamp_min(1e-300).rsqrt(), torch.zeros_like(d))


@register("imtl_g")
class IMTLG(Aggregator):
    """IMTL-G: the combination d = Gᵀw, Σ w = 1, whose projections on every unit task gradient
    u_i = g_i/‖g_i‖ are equal:

        u_iᵀd = t for all i,   Σ_i w_i = 1   ⇔   [N M  -1; 1ᵀ 0] [w; t] = [0; 1],  N = diag(1/‖g_i‖).

    (the paper's closed form, written in Gram terms). Solved with a pseudo-inverse, so linearly
    dependent gradients give the minimum-norm solution instead of an error.
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        system = torch.zeros((K + 1, K + 1), dtype=gram.dtype, device=gram.device)
        system[:K, :K] = unit_scaling(gram)[:, None] * gram
        system[:K, K] = -1.0
        system[K, :K] = 1.0
        rhs = torch.zeros(K + 1, dtype=gram.dtype, device=gram.device)
        rhs[K] = 1.0
        return (torch.linalg.pinv(system) @ rhs)[:K]
