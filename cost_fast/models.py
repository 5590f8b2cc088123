"""Small multi-task models with a shared backbone and K heads, for the demo, tests and benchmarks.

Each model has ``backbone`` (the shared parameters θ), ``heads`` (one module per task) and
``task_losses(x, y) -> Tensor[K]``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def binary_task_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mean binary cross-entropy: L_k = mean_b BCE(logits[b, k], targets[b, k]); shape (K,)."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean(dim=0)


class CelebACNN(nn.Module):
    """The 9-layer CNN of the FairGrad/FAMO/COST CelebA setup: 7 conv + 2 linear shared layers.

    Shared backbone (``width`` = 64 gives the published sizes, ~5.2M parameters):
    conv(3→w) pool, conv(w→2w) conv(2w→2w) pool, conv(2w→4w) conv(4w→4w) pool,
    conv(4w→8w) conv(8w→8w) global-avg-pool, linear(8w→8w) linear(8w→8w), each conv/linear
    followed by BatchNorm and ReLU. Heads: one ``Linear(8w, 1)`` per binary attribute.
    """

    def __init__(self, num_tasks: int = 40, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if num_tasks < 1 or width < 1:
            raise ValueError(f"num_tasks and width must be ≥ 1, got {num_tasks} and {width}")
        w = width
        layers: list[nn.Module] = []
        plan = [
            (in_channels, w, True),
            (w, 2 * w, False),
            (2 * w, 2 * w, True),
            (2 * w, 4 * w, False),
            (4 * w, 4 * w, True),
            (4 * w, 8 * w, False),
            (8 * w, 8 * w, False),
        ]
        for c_in, c_out, pool in plan:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        for _ in range(2):
            layers += [nn.Linear(8 * w, 8 * w, bias=False), nn.BatchNorm1d(8 * w), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(8 * w, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, K)."""
        h = self.backbone(x)
        return torch.cat([head(h) for head in self.heads], dim=1)

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task BCE losses, shape (K,)."""
        return binary_task_losses(self(x), y)


class MultiTaskMLP(nn.Module):
    """A two-layer ReLU MLP backbone with one linear binary head per task."""

    def __init__(self, in_features: int, num_tasks: int, hidden: int = 64) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, K)."""
        h = self.backbone(x)
        return torch.cat([head(h) for head in self.heads], dim=1)

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task BCE losses, shape (K,)."""
        return binary_task_losses(self(x), y)


def conflicting_binary_tasks(
    num_samples: int, in_features: int, num_tasks: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic binary tasks y_k = [x·u_k > 0] with independent random directions u_k.

    The tasks compete for a small shared representation, so their backbone gradients often
    conflict with the mean (a task that merely negates another does not: its head absorbs the
    sign), as CelebA's 40 attributes do.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=gen)
    u = torch.randn(num_tasks, in_features, generator=gen)
    return x, (x @ u.T > 0).float()
