"""The dense-prediction tasks of CityScapes and NYUv2: what a head predicts, its loss, its metric.

    segmentation  log-softmax scores over C classes; loss: mean negative log-likelihood over
                  the labelled pixels (label -1 is unlabelled)
    depth         one channel; loss: mean |d̂ - d| over pixels with d ≠ 0 (0: no depth)
    normal        three channels normalised to unit length; loss: 1 - mean n̂·n over pixels with
                  n ≠ 0 (a zero vector: no normal)

These are the losses of MTAN, Nash-MTL, FairGrad and COST, computed without a host read (the
public code counts the valid pixels with ``torch.nonzero``, a device sync per loss), and 0 for
a batch without a valid pixel where theirs is NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.nn import functional as F

from cost_fast.metrics import DepthMetrics, NormalMetrics, SegmentationMetrics

Kind = Literal["segmentation", "depth", "normal"]
IGNORE_LABEL = -1


@dataclasses.dataclass(frozen=True)
class DenseTask:
    """One dense task (module docstring).

    Attributes:
        name: the task's name in losses, metrics and reports ("segmentation", "depth", ...).
        kind: "segmentation", "depth" or "normal".
        classes: the number of classes C of a segmentation task (0 for the others).
    """

    name: str
    kind: Kind
    classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("segmentation", "depth", "normal"):
            raise ValueError(f"a dense task's kind is segmentation, depth or normal, got {self.kind!r}")
        if (self.kind == "segmentation") != (self.classes > 0):
            raise ValueError(
                f"task {self.name!r}: a segmentation task has classes ≥ 1, the others 0; got {self.classes}"
            )

    @property
    def channels(self) -> int:
        """Output channels of the task's head: C, 1 or 3."""
        return {"segmentation": self.classes, "depth": 1, "normal": 3}[self.kind]

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        """The prediction from the head's output (B, channels, H, W): log-softmax scores,
        the depth itself, or unit normals."""
        if self.kind == "segmentation":
            return F.log_softmax(raw, dim=1)
        if self.kind == "normal":
            return F.normalize(raw, dim=1)
        return raw

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss (module docstring), a scalar; ``target`` (B, H, W) class indices for
        segmentation, (B, 1, H, W) depths, (B, 3, H, W) normals."""
        if self.kind == "segmentation":
            target = target.long()
            labelled = (target != IGNORE_LABEL).sum().clamp_min(1)
            return F.nll_loss(prediction, target, ignore_index=IGNORE_LABEL, reduction="sum") / labelled
        if self.kind == "depth":
            valid = (target != 0).to(prediction.dtype)
            return ((prediction - target).abs() * valid).sum() / valid.sum().clamp_min(1)
        valid = (target.abs().sum(dim=1) > 0).to(prediction.dtype)
        return 1 - ((prediction * target).sum(dim=1) * valid).sum() / valid.sum().clamp_min(1)

    def metrics(self) -> SegmentationMetrics | DepthMetrics | NormalMetrics:
        """A fresh accumulator of the task's metrics (``cost_fast.metrics.tasks``)."""
        if self.kind == "segmentation":
            return SegmentationMetrics(self.classes, ignore_index=IGNORE_LABEL)
        return DepthMetrics() if self.kind == "depth" else NormalMetrics()
