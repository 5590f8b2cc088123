"""The tug-of-war problem several tests share: a shared backbone pulled toward four targets by four
tasks (some task always opposes the mean gradient once trained a little, so COST's trigger
fires), plus one linear head per task so that the heads' update is checked too."""

from __future__ import annotations

import torch

K = 4
TARGETS = (1.0, -1.0, 1.5, -2.0)


class Tug(torch.nn.Module):
    """Backbone Linear(6, 8) - Tanh - Linear(8, 3); head i: Linear(3, 1);
    L_i = mean_b (head_i(h) - t_i)² + mean_b (Σ_j h_j - t_i)²."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(K))

    def task_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        out = torch.cat([head(h) for head in self.heads], dim=1)
        return ((out - targets) ** 2).mean(dim=0) + (h.sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


def tug_batches(
    seed: int, count: int, dtype: torch.dtype = torch.float32, size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``size`` inputs drawn from a generator seeded ``seed``, with the targets."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor(TARGETS, dtype=dtype)
    return [(torch.randn(size, 6, generator=gen, dtype=dtype), targets.expand(size, K)) for _ in range(count)]
