"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020)."""

from __future__ import annotations

from typing import Any

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.checks import check_seed
from cost_fast.registry import register


@register("pcgrad")
class PCGrad(Aggregator):
    """PCGrad: each task gradient, in its own random order over the other tasks, is projected
    onto the normal plane of every gradient it conflicts with,

        g_i ← g_i - (g_iᵀg_j / ‖g_j‖²) g_j   if g_iᵀg_j < 0,

    and d = Σ_i g_i (the projected ones). Each projected g_i is tracked as coefficients c_i over
    the original gradients (g_i = Σ_k C_ik g_k), so every dot product comes from M and all K
    tasks advance together: K vectorized steps. w = Σ_i C_i (column sums of C).

    Args:
        seed: seed of the projection orders (a CPU ``torch.Generator``; its state is the
            method's ``state_dict``).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed("seed", seed)
        self._generator = torch.Generator().manual_seed(seed)

    def projection_coefficients(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, order): rows of C give the projected gradients over G; order[i] is task i's order."""
        K = gram.shape[0]
        order = torch.argsort(torch.rand(K, K, generator=self._generator), dim=1).to(gram.device)
        C = torch.eye(K, dtype=gram.dtype, device=gram.device)
        rows = torch.arange(K, device=gram.device)
        sq_norms = gram.diagonal()
        for step in range(K):
            j = order[:, step]
            dots = (C @ gram)[rows, j]
            conflict = (dots < 0) & (j != rows) & (sq_norms[j] > 0)
            coef = torch.where(conflict, dots / sq_norms[j].clamp_min(1e-300), torch.zeros_like(dots))
            C[rows, j] -= coef
        return C, order

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        C, _ = self.projection_coefficients(gram)
        return C.sum(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng_state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator.set_state(state["rng_state"])
