"""Task metrics of the dense-prediction and attribute benchmarks, accumulated over a whole split.

Each metric is an accumulator: ``update(prediction, target)`` per batch adds to counts kept on
the prediction's device (no host read, so an evaluation loop launches its kernels without a
sync), ``compute()`` reads them once and returns plain floats. The values are over every valid
pixel (or sample) of the split, so they do not depend on the batch size; the public code of
MTAN, Nash-MTL, FairGrad and COST averages per-batch values over the batches instead, which
equals ours when every batch has as many valid pixels. Percentages are in percent, as the
papers' tables.

- ``SegmentationMetrics``: mIoU and pixel accuracy from a confusion matrix, pixels labelled
  ``ignore_index`` (-1) left out.
- ``DepthMetrics``: absolute and relative error over pixels with a non-zero target.
- ``NormalMetrics``: the angle between predicted and target normals over pixels with a non-zero
  target: mean, median, and the share within 11.25°, 22.5° and 30°.
- ``AttributeMetrics``: per-attribute accuracy and F1 of binary predictions (logit > 0).
"""

from __future__ import annotations

import math

import torch

from cost_fast.checks import check_int

ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
# The median angle is read from a histogram of this bin width (degrees): exact to it.
ANGLE_BIN = 0.01


def _count(index: torch.Tensor, size: int) -> torch.Tensor:
    """counts[i] = #{index == i} for i < size, indices ≥ size dropped; a scatter into a buffer
    of fixed size, where boolean indexing and ``torch.bincount`` on CUDA would read the data's
    size back to the host."""
    flat = index.reshape(-1).clamp(0, size)
    return torch.zeros(size + 1, dtype=torch.int64, device=index.device).scatter_add_(0, flat, torch.ones_like(flat))[
        :size
    ]


class SegmentationMetrics:
    """Confusion matrix C[t, p] = #pixels of true class t predicted as p, over the pixels whose
    label is in [0, num_classes) (``ignore_index`` and any other value left out); then

        IoU_c = C[c, c] / (Σ_p C[c, p] + Σ_t C[t, c] - C[c, c]),   mIoU = mean_c IoU_c,
        pixel accuracy = Σ_c C[c, c] / Σ C,

    the mean over the classes that occur in the labels or the predictions (a class in neither
    has no IoU). ``compute()``: ``{"miou": %, "pixel_accuracy": %}``.

    Args:
        num_classes: C ≥ 1. ignore_index: the label of unlabelled pixels (default -1).
    """

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        check_int("num_classes", num_classes, 1)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion: torch.Tensor | None = None

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` scores (B, C, H, W) (their arg-max is the class) or
        classes (B, H, W); ``target`` classes (B, H, W)."""
        classes = prediction.argmax(dim=1) if prediction.dim() == target.dim() + 1 else prediction
        if classes.shape != target.shape:
            raise ValueError(
                f"predicted classes {tuple(classes.shape)} and labels {tuple(target.shape)} differ in shape"
            )
        target = target.long()
        n = self.num_classes
        valid = (target >= 0) & (target < n) & (target != self.ignore_index)
        pairs = torch.where(valid, target * n + classes.long(), n * n)
        counts = _count(pairs, n * n).reshape(n, n)
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def compute(self) -> dict[str, float]:
        """``{"miou", "pixel_accuracy"}`` in percent (one host read)."""
        if self.confusion is None:
            raise ValueError("SegmentationMetrics.compute: no batch was added")
        c = self.confusion.double().cpu()
        diag = c.diagonal()
        union = c.sum(0) + c.sum(1) - diag
        present = union > 0
        if c.sum() == 0:
            raise ValueError("SegmentationMetrics.compute: no labelled pixel in the split")
        iou = diag[present] / union[present]
        return {"miou": 100.0 * float(iou.mean()), "pixel_accuracy": 100.0 * float(diag.sum() / c.sum())}


class DepthMetrics:
    """Over the pixels whose target depth d is non-zero (0 marks a missing depth), with d̂ the
    prediction:

        abs_err = mean |d̂ - d|,   rel_err = mean |d̂ - d| / |d|.

    ``compute()``: ``{"abs_err", "rel_err"}``."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [Σ abs, Σ rel, count]

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` of one shape, (B, 1, H, W)."""
        if prediction.shape != target.shape:
            raise ValueError(f"predicted depth {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        valid = target != 0
        error = (prediction.detach().double() - target.double()).abs()
        sums = torch.stack(
            [
                torch.where(valid, error, 0).sum(),
                torch.where(valid, error / torch.where(valid, target.double().abs(), 1), 0).sum(),
                valid.sum().double(),
            ]
        )
        self.sums = sums if self.sums is None else self.sums + sums

    def compute(self) -> dict[str, float]:
        """``{"abs_err", "rel_err"}`` (one host read)."""
        if self.sums is None:
            raise ValueError("DepthMetrics.compute: no batch was added")
        total_abs, total_rel, count = self.sums.tolist()
        if count == 0:
            raise ValueError("DepthMetrics.compute: no pixel with a depth in the split")
        return {"abs_err": total_abs / count, "rel_err": total_rel / count}


class NormalMetrics:
    """Over the pixels whose target normal n is non-zero (a zero vector marks a missing normal),
    with n̂ the prediction, the angle a = arccos(n̂·n / (‖n̂‖ ‖n‖)) in degrees:

        mean = mean a,  median = the lower median of a (``torch.median``'s; from a histogram of
        ``ANGLE_BIN`` = 0.01° bins, to within half a bin),
        within_t = 100 · #{a < t} / #pixels for t in 11.25, 22.5, 30.

    ``compute()``: ``{"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}``."""

    def __init__(self) -> None:
        self.bins = math.ceil(180.0 / ANGLE_BIN)
        self.histogram: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None  # [Σ a, count, #within each threshold]

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` of shape (B, 3, H, W)."""
        if prediction.shape != target.shape or prediction.dim() != 4:
            raise ValueError(
                f"predicted normals {tuple(prediction.shape)} and targets {tuple(target.shape)} must both be (B, 3, H, W)"
            )
        p, t = prediction.detach().double(), target.double()
        valid = t.abs().sum(dim=1) > 0
        cos = (p * t).sum(dim=1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-12)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
        index = torch.where(valid, (angle / ANGLE_BIN).long().clamp(0, self.bins - 1), self.bins)
        histogram = _count(index, self.bins)
        sums = torch.stack(
            [torch.where(valid, angle, 0).sum(), valid.sum().double()]
            + [((angle < threshold) & valid).sum().double() for threshold in ANGLE_THRESHOLDS]
        )
        self.histogram = histogram if self.histogram is None else self.histogram + histogram
        self.sums = sums if self.sums is None else self.sums + sums

    def compute(self) -> dict[str, float]:
        """The angle statistics in degrees and percent (one host read each for the sums and
        the histogram)."""
        if self.sums is None or self.histogram is None:
            raise ValueError("NormalMetrics.compute: no batch was added")
        total, count, *within = self.sums.tolist()
        if count == 0:
            raise ValueError("NormalMetrics.compute: no pixel with a normal in the split")
        cumulative = self.histogram.cpu().cumsum(0)
        # the lower median (torch.median's): the bin of the ⌈count/2⌉-th smallest angle, its middle
        rank = torch.tensor(math.ceil(count / 2), dtype=cumulative.dtype)
        median = (int(torch.searchsorted(cumulative, rank)) + 0.5) * ANGLE_BIN
        result = {"mean_angle": total / count, "median_angle": median}
        for threshold, hits in zip(ANGLE_THRESHOLDS, within):
            result[f"within_{threshold:g}"] = 100.0 * hits / count
        return result


class AttributeMetrics:
    """Binary attributes predicted as logit > 0 (sigmoid > 1/2), per attribute k:

        accuracy_k = 100 · (TP_k + TN_k) / #samples,
        F1_k = 100 · 2 TP_k / (2 TP_k + FP_k + FN_k)   (= 2PR / (P + R); 0 when TP = FP = FN = 0).

    ``compute()``: ``{"accuracy": [K values], "f1": [K values], "mean_accuracy", "mean_f1"}``.

    Args:
        num_tasks: K ≥ 1 attributes.
    """

    def __init__(self, num_tasks: int) -> None:
        check_int("num_tasks", num_tasks, 1)
        self.num_tasks = num_tasks
        self.counts: torch.Tensor | None = None  # (4, K): TP, FP, FN, TN

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``logits`` and 0/1 ``target`` of shape (B, K)."""
        if logits.shape != target.shape or logits.dim() != 2 or logits.shape[1] != self.num_tasks:
            raise ValueError(
                f"logits {tuple(logits.shape)} and targets {tuple(target.shape)} must both be (B, {self.num_tasks})"
            )
        predicted = logits.detach() > 0
        truth = target > 0.5
        counts = torch.stack(
            [
                (predicted & truth).sum(0),
                (predicted & ~truth).sum(0),
                (~predicted & truth).sum(0),
                (~predicted & ~truth).sum(0),
            ]
        )
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self) -> dict[str, float | list[float]]:
        """Per-attribute accuracy and F1 in percent, and their means (one host read)."""
        if self.counts is None:
            raise ValueError("AttributeMetrics.compute: no batch was added")
        tp, fp, fn, tn = self.counts.double().cpu()
        accuracy = 100.0 * (tp + tn) / (tp + fp + fn + tn)
        denominator = 2 * tp + fp + fn
        f1 = torch.where(denominator > 0, 100.0 * 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
        return {
            "accuracy": accuracy.tolist(),
            "f1": f1.tolist(),
            "mean_accuracy": float(accuracy.mean()),
            "mean_f1": float(f1.mean()),
        }
