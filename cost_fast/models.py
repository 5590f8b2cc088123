"""Small multi-task models with a shared backbone and K heads, for the demo, tests and benchmarks.

Each model has ``backbone`` (the shared parameters θ), ``heads`` (one module per task) and
``task_losses(x, y) -> Tensor[K]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def batch_task_losses(model: nn.Module, batch: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """The ``loss_fn(model, batch)`` of COST for these models: ``model.task_losses(x, y)`` for a
    batch (x, y); shape (K,)."""
    x, y = batch
    return model.task_losses(x, y)


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


class SegNetMTL(nn.Module):
    """A small SegNet-style encoder-decoder with the three NYUv2 heads (shared backbone:
    encoder + decoder; heads: 1x1 convs).

    Tasks: semantic segmentation (``num_classes`` classes, cross-entropy over labelled pixels,
    label -1 ignored), depth (L1 over pixels with depth > 0), surface normals (1 - cosine between
    unit normals, over pixels with a nonzero target). Inputs (B, 3, H, W) with H, W divisible by 4.
    """

    def __init__(self, num_classes: int = 13, width: int = 16) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.backbone = nn.Sequential(
            *block(3, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.Upsample(scale_factor=2),
            *block(4 * w, 2 * w),
            nn.Upsample(scale_factor=2),
            *block(2 * w, w),
        )
        self.heads = nn.ModuleList([nn.Conv2d(w, num_classes, 1), nn.Conv2d(w, 1, 1), nn.Conv2d(w, 3, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[segmentation logits (B, C, H, W), depth (B, 1, H, W), unit normals (B, 3, H, W)]."""
        h = self.backbone(x)
        seg, depth, normal = (head(h) for head in self.heads)
        return [seg, depth, F.normalize(normal, dim=1)]

    def task_losses(self, x: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(segmentation, depth, normal) losses, shape (3,)."""
        seg_t, depth_t, normal_t = targets
        seg, depth, normal = self(x)
        seg_loss = F.cross_entropy(seg, seg_t, ignore_index=-1)
        valid = (depth_t > 0).to(depth.dtype)
        depth_loss = ((depth - depth_t).abs() * valid).sum() / valid.sum().clamp_min(1)
        has_normal = (normal_t.abs().sum(dim=1) > 0).to(normal.dtype)
        normal_loss = ((1 - (normal * normal_t).sum(dim=1)) * has_normal).sum() / has_normal.sum().clamp_min(1)
        return torch.stack([seg_loss, depth_loss, normal_loss])


def synthetic_nyuv2(num_samples: int, size: int = 32, num_classes: int = 13, *, seed: int = 0):
    """Random images with piecewise-smooth segmentation, depth and unit-normal targets whose
    structure depends on the image, so that a model can learn them (NYUv2-shaped, not NYUv2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 3, size, size, generator=gen)
    smooth = F.avg_pool2d(x, 5, stride=1, padding=2)
    seg = (smooth[:, 0] * 3).floor().clamp(-6, 6).long() + 6
    seg = seg % num_classes
    depth = (smooth[:, 1:2] + 2).clamp_min(0.1)
    normal = F.normalize(torch.cat([smooth[:, 2:3], smooth[:, :2]], dim=1), dim=1)
    return x, (seg, depth, normal)
