"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.registry import register


def aligning_matrix(gram: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """B = sqrt(λ_min) V Λ^(-1/2) Vᵀ over the eigenpairs of M with λ > rtol·λ_max.

    The aligned gradients BG have Gram matrix B M Bᵀ = λ_min V_r V_rᵀ: condition number 1 on
    the span of the gradients.
    """
    lam, V = torch.linalg.eigh(gram)
    keep = lam > rtol * lam.max().clamp_min(0)
    lam_kept = torch.where(keep, lam, torch.ones_like(lam))
    inv_sqrt = torch.where(keep, lam_kept.rsqrt(), torch.zeros_like(lam))
    lam_min = torch.where(keep, lam, torch.full_like(lam, float("inf"))).min()
    lam_min = torch.where(keep.any(), lam_min, torch.zeros_like(lam_min))
    return lam_min.sqrt() * (V * inv_sqrt) @ V.T


@register("aligned_mtl")
class AlignedMTL(Aggregator):
    """Aligned-MTL: replace G by the aligned system Ĝ = B G (B from ``aligning_matrix``),
    whose gradients are orthogonal with equal norms sqrt(λ_min), and take their mean:

        d = Ĝᵀ(1/K) = Gᵀ (Bᵀ 1/K),   so   w = B 1/K   (B is symmetric).
    """

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        return aligning_matrix(gram) @ torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
