"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch

from cost_fast.aggregators.base import Aggregator, clone_or_none
from cost_fast.checks import check_positive, check_seed
from cost_fast.registry import register


@register("gradvac")
class GradVac(Aggregator):
    """GradVac: raise each pairwise cosine to an EMA target instead of only removing conflicts.

    For each task i, over the other tasks j in a random order, with φ_ij = cos(g_i, g_j) and
    the target φ̂_ij (EMA of past cosines, initially 0):

        if φ_ij < φ̂_ij:  g_i ← g_i + ‖g_i‖ (φ̂_ij sqrt(1-φ_ij²) - φ_ij sqrt(1-φ̂_ij²))
                                        / (‖g_j‖ sqrt(1-φ̂_ij²)) · g_j      (then cos(g_i, g_j) = φ̂_ij)
        φ̂_ij ← (1-β) φ̂_ij + β φ_ij

    and d = Σ_i g_i. Tracked as coefficients over G (as PCGrad), so it needs only M.

    Args:
        beta: EMA rate β ∈ (0, 1] of the targets (default 0.01, as in the paper).
        seed: seed of the random orders.
    """

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        self.beta = check_positive("beta", beta)
        if self.beta > 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        self.seed = check_seed("seed", seed)
        self._generator = torch.Generator().manual_seed(seed)
        self.targets: torch.Tensor | None = None

    def vaccinate(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C, order, used): adjusted gradients C @ G, each task's order, and the targets used."""
        K = gram.shape[0]
        if self.targets is None:
            self.targets = torch.zeros(K, K, dtype=torch.float64)
        if self.targets.shape != (K, K):
            raise ValueError(f"GradVac was used with K = {self.targets.shape[0]} tasks, now K = {K}")
        targets = self.targets.to(gram.device, gram.dtype)
        used = targets.clone()
        order = torch.argsort(torch.rand(K, K, generator=self._generator), dim=1).to(gram.device)
        C = torch.eye(K, dtype=gram.dtype, device=gram.device)
        rows = torch.arange(K, device=gram.device)
        nj_all = gram.diagonal().clamp_min(0).sqrt()
        limit = 1 - 1e-6
        for step in range(K):
            j = order[:, step]
            CM = C @ gram
            ni = (CM * C).sum(dim=1).clamp_min(0).sqrt()
            nj = nj_all[j]
            valid = (j != rows) & (ni > 0) & (nj > 0)
            phi = torch.where(valid, CM[rows, j] / (ni * nj).clamp_min(1e-300), torch.zeros_like(ni)).clamp(-1, 1)
            target = targets[rows, j].clamp(-limit, limit)
            used[rows, j] = target
            root_phi, root_target = (1 - phi**2).clamp_min(0).sqrt(), (1 - target**2).sqrt()
            coef = ni * (target * root_phi - phi * root_target) / (nj.clamp_min(1e-300) * root_target)
            C[rows, j] += torch.where(valid & (phi < target), coef, torch.zeros_like(coef))
            ema = (1 - self.beta) * targets[rows, j] + self.beta * phi
            targets[rows, j] = torch.where(valid, ema, targets[rows, j])
        self.targets = targets.detach().to("cpu", torch.float64)
        return C, order, used

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        C, _, _ = self.vaccinate(gram)
        return C.sum(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"targets": clone_or_none(self.targets), "rng_state": self._generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets = clone_or_none(state["targets"])
        self._generator.set_state(state["rng_state"])
        self.seed = state["seed"]


__all__ = ["GradVac"]
