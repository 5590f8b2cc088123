"""Δm% against a hand computation, and its refusals."""

from __future__ import annotations

import pytest

from cost_fast.metrics import delta_m


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
