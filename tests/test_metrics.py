"""Δm%, MR and the task metrics against hand computations, and their refusals."""

from __future__ import annotations

import pytest
import torch

from cost_fast.metrics import AttributeMetrics, DepthMetrics, NormalMetrics, SegmentationMetrics, delta_m, mean_rank


def test_delta_m_by_hand() -> None:
    # accuracy 0.90 -> 0.93 (higher is better): -(0.93 - 0.90)/0.90 = -3.333...%
    # error 0.20 -> 0.25 (lower is better):     +(0.25 - 0.20)/0.20 = +25%
    # mean: (25 - 3.333...)/2 = 10.8333...%
    got = delta_m({"acc": 0.93, "err": 0.25}, {"acc": 0.90, "err": 0.20}, {"acc": True, "err": False})
    assert got == pytest.approx((25.0 - 100 * 0.03 / 0.90) / 2, rel=1e-12)


def test_delta_m_is_zero_at_the_baselines_and_negative_when_better() -> None:
    base = {"a": 0.5, "b": 2.0}
    better = {"a": True, "b": False}
    assert delta_m(base, base, better) == 0.0
    assert delta_m({"a": 0.6, "b": 1.5}, base, better) < 0


@pytest.mark.parametrize(
    ("results", "baselines", "higher", "match"),
    [
        ({}, {}, {}, "at least one metric"),
        ({"a": 1.0}, {"a": 1.0, "b": 1.0}, {"a": True}, "baselines must name"),
        ({"b": 1.0}, {"a": 1.0}, {"a": True}, "results must name"),
        ({"a": 1.0}, {"a": 0.0}, {"a": True}, "baseline of metric 'a' is 0"),
        ({"a": float("nan")}, {"a": 1.0}, {"a": True}, "not finite"),
        ({"a": 1.0}, {"a": 1.0}, {"a": 1}, "True or False"),
    ],
)
def test_delta_m_refuses(results, baselines, higher, match) -> None:
    with pytest.raises(ValueError, match=match):
        delta_m(results, baselines, higher)


def test_mean_rank_by_hand() -> None:
    # acc (higher better): A 0.9, B 0.8, C 0.9 -> A, C tie for ranks 1-2 (1.5 each), B 3
    # err (lower better):  A 0.3, B 0.1, C 0.2 -> B 1, C 2, A 3
    results = {"A": {"acc": 0.9, "err": 0.3}, "B": {"acc": 0.8, "err": 0.1}, "C": {"acc": 0.9, "err": 0.2}}
    got = mean_rank(results, {"acc": True, "err": False})
    assert got == {"A": (1.5 + 3) / 2, "B": (3 + 1) / 2, "C": (1.5 + 2) / 2}


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ({"A": {"a": 1.0}}, "at least two"),
        ({"A": {"a": 1.0}, "B": {"b": 1.0}}, "method 'B' must name"),
        ({"A": {"a": 1.0}, "B": {"a": float("inf")}}, "not finite"),
    ],
)
def test_mean_rank_refuses(results, match) -> None:
    with pytest.raises(ValueError, match=match):
        mean_rank(results, {"a": True})


def test_segmentation_metrics_by_hand() -> None:
    # 2 classes; labels with one ignored pixel (-1). Pixels (label, predicted):
    # (0,0) (0,1) (1,1) (1,1) (-1,0) and, in a second batch, (1,0) (0,0)
    # confusion [[2, 1], [1, 2]] -> IoU_0 = 2 / (3 + 3 - 2) = 0.5, IoU_1 = 2 / 4 = 0.5; acc 4/6
    metric = SegmentationMetrics(num_classes=2)
    metric.update(torch.tensor([[[0, 1, 1, 1, 0]]]), torch.tensor([[[0, 0, 1, 1, -1]]]))
    scores = torch.tensor([[[[0.9, 0.8]], [[0.1, 0.2]]]])  # (B=1, C=2, H=1, W=2): arg-max 0, 0
    metric.update(scores, torch.tensor([[[1, 0]]]))
    got = metric.compute()
    assert got["miou"] == pytest.approx(50.0)
    assert got["pixel_accuracy"] == pytest.approx(100 * 4 / 6)


def test_segmentation_miou_leaves_out_classes_nowhere() -> None:
    # 3 classes, class 2 neither labelled nor predicted: the mean is over classes 0 and 1
    metric = SegmentationMetrics(num_classes=3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))  # IoU_0 = 1/2, IoU_1 = 0
    assert metric.compute()["miou"] == pytest.approx(25.0)


def test_depth_metrics_by_hand() -> None:
    # valid targets 2 and 4 (0 is missing): |2.5-2| = 0.5, |3-4| = 1 -> abs 0.75, rel (0.25 + 0.25)/2
    metric = DepthMetrics()
    metric.update(torch.tensor([[[[2.5, 9.0]]]]), torch.tensor([[[[2.0, 0.0]]]]))
    metric.update(torch.tensor([[[[3.0]]]]), torch.tensor([[[[4.0]]]]))
    got = metric.compute()
    assert got["abs_err"] == pytest.approx(0.75)
    assert got["rel_err"] == pytest.approx(0.25)


def test_normal_metrics_by_hand() -> None:
    # angles 0°, 10°, 20°, 45° between unit vectors in the x-y plane, one missing pixel (zero target)
    degrees = torch.tensor([0.0, 10.0, 20.0, 45.0])
    prediction = torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees)), torch.zeros(4)])
    prediction = torch.cat([prediction, torch.tensor([[1.0], [0.0], [0.0]])], dim=1)  # (3, 5)
    target = torch.tensor([[1.0] * 4 + [0.0], [0.0] * 5, [0.0] * 5])
    metric = NormalMetrics()
    metric.update(2 * prediction[None, :, None, :], target[None, :, None, :])  # not unit: normalised
    got = metric.compute()
    assert got["mean_angle"] == pytest.approx(75 / 4, abs=1e-4)
    assert got["median_angle"] == pytest.approx(10.0, abs=0.0051)  # the lower median, as torch.median
    assert got["within_11.25"] == pytest.approx(50.0)
    assert got["within_22.5"] == pytest.approx(75.0)
    assert got["within_30"] == pytest.approx(75.0)


def test_normal_median_of_many_angles_to_its_bin() -> None:
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(1001, generator=gen, dtype=torch.float64) * 90
    rad = torch.deg2rad(angles)
    prediction = torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)])[None, :, None, :]
    target = torch.zeros_like(prediction)
    target[:, 0] = 1
    metric = NormalMetrics()
    metric.update(prediction, target)
    assert metric.compute()["median_angle"] == pytest.approx(float(angles.median()), abs=0.0051)


def test_attribute_metrics_by_hand() -> None:
    # attribute 0: predictions (logit > 0) 1 1 0 0 against 1 0 1 0 -> TP 1, FP 1, FN 1, TN 1
    #   accuracy 50%, F1 = 2 / (2 + 1 + 1) = 50%
    # attribute 1: never predicted, never true -> accuracy 100%, F1 0 (no positive anywhere)
    logits = torch.tensor([[2.0, -1.0], [0.5, -1.0], [-0.5, -2.0], [-3.0, -1.0]])
    target = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]])
    metric = AttributeMetrics(num_tasks=2)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    got = metric.compute()
    assert got["accuracy"] == pytest.approx([50.0, 100.0])
    assert got["f1"] == pytest.approx([50.0, 0.0])
    assert got["mean_f1"] == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("make", "prediction", "target", "match"),
    [
        (lambda: SegmentationMetrics(2), torch.zeros(1, 2, 3), torch.zeros(1, 3, 2, dtype=torch.long), "shape"),
        (DepthMetrics, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3), "differ"),
        (NormalMetrics, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), r"\(B, 3, H, W\)"),
        (lambda: AttributeMetrics(3), torch.zeros(2, 2), torch.zeros(2, 2), r"\(B, 3\)"),
    ],
)
def test_task_metrics_refuse_mismatched_shapes(make, prediction, target, match) -> None:
    with pytest.raises(ValueError, match=match):
        make().update(prediction, target)


@pytest.mark.parametrize(
    "make", [lambda: SegmentationMetrics(2), DepthMetrics, NormalMetrics, lambda: AttributeMetrics(2)]
)
def test_task_metrics_refuse_an_empty_split(make) -> None:
    with pytest.raises(ValueError, match="no batch"):
        make().compute()


def test_depth_and_normals_refuse_a_split_without_valid_pixels() -> None:
    depth = DepthMetrics()
    depth.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="no pixel"):
        depth.compute()
    normals = NormalMetrics()
    normals.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="no pixel"):
        normals.compute()
