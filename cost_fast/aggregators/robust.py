"""Byzantine-robust aggregators: Krum (from the Gram matrix) and the coordinate-wise trimmed mean
(from G itself)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator, GradientAggregator
from cost_fast.checks import check_int
from cost_fast.kernels.gram_torch import check_grad_matrix, upcast_16bit
from cost_fast.registry import register


@register("krum")
class Krum(Aggregator):
    """Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017). With the squared distances from M, ‖g_i - g_j‖² = M_ii + M_jj - 2 M_ij,
    each gradient's score is the sum of its distances to its K - f - 2 nearest others; the m
    gradients of lowest score are averaged: w_i = 1/m for them, 0 for the rest. Robust to f
    arbitrary gradients when K ≥ 2f + 3 (required for f > 0; with f = 0 and K = 2 the one
    other gradient is the neighbour).

    Args:
        n_byzantine: f ≥ 0 (default 0). n_selected: m ≥ 1 (default 1).
    """

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1) -> None:
        self.n_byzantine = check_int("n_byzantine", n_byzantine, 0)
        self.n_selected = check_int("n_selected", n_selected, 1)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        if self.n_selected > K or (self.n_byzantine > 0 and K < 2 * self.n_byzantine + 3):
            raise ValueError(
                f"Krum with f={self.n_byzantine}, m={self.n_selected} needs K ≥ 2f + 3 and m ≤ K, got K={K}"
            )
        if K == 1:
            return torch.ones(1, dtype=gram.dtype, device=gram.device)
        diag = gram.diagonal()
        distances = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)
        distances.fill_diagonal_(float("inf"))  # a gradient is not its own neighbour
        # K - f - 2 neighbours; with f = 0 and K = 2 (no robustness to ask for) the other one
        neighbours = min(max(K - self.n_byzantine - 2, 1), K - 1)
        nearest = torch.topk(distances, neighbours, dim=1, largest=False).values
        scores = nearest.sum(dim=1)
        chosen = torch.topk(scores, self.n_selected, largest=False).indices
        w = torch.zeros(K, dtype=gram.dtype, device=gram.device)
        w[chosen] = 1.0 / self.n_selected
        return w


@register("trimmed_mean")
class TrimmedMean(GradientAggregator):
    """Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018): for every coordinate p, drop the t largest and the t
    smallest of g_1p, ..., g_Kp and average the K - 2t left. Each coordinate stays within the
    range of the honest values when at most t gradients are arbitrary.

    Args:
        trim_number: t ≥ 0 (default 1); needs K > 2t.
    """

    def __init__(self, trim_number: int = 1) -> None:
        self.trim_number = check_int("trim_number", trim_number, 0)

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        check_grad_matrix(G)
        K, t = G.shape[0], self.trim_number
        if K <= 2 * t:
            raise ValueError(f"TrimmedMean with t={t} needs more than {2 * t} tasks, got {K}")
        ordered = torch.sort(upcast_16bit(G), dim=0).values
        return ordered[t : K - t].mean(dim=0)
