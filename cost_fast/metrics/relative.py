"""Δm% and MR: how a multi-task model compares with single-task baselines and with other methods.

The multi-task literature (Maninis et al., CVPR 2019; used by Nash-MTL, FAMO, FairGrad and the
COST paper) reports one number per method, averaged over the N metrics of all tasks,

    Δm% = (100 / N) Σ_j (-1)^{h_j} (M_{m,j} - M_{b,j}) / M_{b,j},

with M_{m,j} the multi-task model's value of metric j, M_{b,j} the single-task baseline's, and
h_j = 1 when higher is better for metric j (accuracy, mIoU), 0 when lower is (error, loss). Lower
is better: Δm% < 0 means the multi-task model beats the single-task models on average. (LibMTL's
"Δp" averages over the metrics of each task first, then over tasks, and has the opposite sign.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def delta_m(
    results: Mapping[str, float], baselines: Mapping[str, float], higher_is_better: Mapping[str, bool]
) -> float:
    """Δm% = (100/N) Σ_j (-1)^{h_j} (M_{m,j} - M_{b,j}) / M_{b,j} over the N metrics named in
    ``higher_is_better`` (module docstring): lower is better, 0 when the results equal the baselines.

    Args:
        results: metric name → the multi-task model's value.
        baselines: metric name → the single-task baseline's value (finite, non-zero).
        higher_is_better: metric name → True when a higher value is better (h_j = 1).

    Raises:
        ValueError: the three mappings do not name the same metrics, there are none, a value is
            not finite, or a baseline is 0.
    """
    names = set(higher_is_better)
    if not names:
        raise ValueError("delta_m needs at least one metric")
    for what, mapping in (("results", results), ("baselines", baselines)):
        if set(mapping) != names:
            missing, extra = sorted(names - set(mapping)), sorted(set(mapping) - names)
            raise ValueError(
                f"{what} must name the metrics of higher_is_better: missing {missing}, not expected {extra}"
            )
    total = 0.0
    for name in sorted(names):
        if not isinstance(higher_is_better[name], bool):
            raise ValueError(f"higher_is_better[{name!r}] must be True or False, got {higher_is_better[name]!r}")
        value, base = float(results[name]), float(baselines[name])
        if not (math.isfinite(value) and math.isfinite(base)):
            raise ValueError(f"metric {name!r} is not finite: result {value}, baseline {base}")
        if base == 0:
            raise ValueError(f"the baseline of metric {name!r} is 0: a relative change is undefined")
        sign = -1.0 if higher_is_better[name] else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(names)


def mean_rank(results: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]) -> dict[str, float]:
    """MR: each method's rank on every metric, averaged over the N metrics named in
    ``higher_is_better``,

        MR_m = (1 / N) Σ_j rank_j(m),

    where rank_j(m) = 1 for the best value of metric j among the methods, 2 for the next, and
    methods with equal values share the mean of the ranks they span (1 and 2 tied: 1.5 each).
    Lower is better. (The COST paper's tables rank over every metric of every task this way.)

    Args:
        results: method name → {metric name → value}; every method names the same metrics.
        higher_is_better: metric name → True when a higher value is better.

    Raises:
        ValueError: fewer than two methods, no metric, a method missing or adding a metric, a
            value that is not finite.
    """
    names = set(higher_is_better)
    if len(results) < 2:
        raise ValueError(f"mean_rank compares at least two methods, got {len(results)}")
    if not names:
        raise ValueError("mean_rank needs at least one metric")
    for method, values in results.items():
        if set(values) != names:
            missing, extra = sorted(names - set(values)), sorted(set(values) - names)
            raise ValueError(f"method {method!r} must name the metrics: missing {missing}, not expected {extra}")
        for name, value in values.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"metric {name!r} of method {method!r} is not finite: {value}")
    total = {method: 0.0 for method in results}
    for name in sorted(names):
        sign = -1.0 if higher_is_better[name] else 1.0
        order = sorted(results, key=lambda m: sign * float(results[m][name]))
        start = 0
        while start < len(order):  # a run of equal values shares the mean of its ranks
            end = start
            while end + 1 < len(order) and float(results[order[end + 1]][name]) == float(results[order[start]][name]):
                end += 1
            for method in order[start : end + 1]:
                total[method] += (start + end) / 2 + 1
            start = end + 1
    return {method: rank / len(names) for method, rank in total.items()}
