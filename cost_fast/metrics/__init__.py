"""Metrics: ``relative`` (Δm% against single-task baselines, MR over methods) and ``tasks``
(the benchmarks' task metrics, accumulated over a split)."""

from cost_fast.metrics.relative import delta_m, mean_rank
from cost_fast.metrics.tasks import AttributeMetrics, DepthMetrics, NormalMetrics, SegmentationMetrics

__all__ = ["AttributeMetrics", "DepthMetrics", "NormalMetrics", "SegmentationMetrics", "delta_m", "mean_rank"]
