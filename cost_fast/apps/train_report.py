"""What a ``cost-fast train`` run writes about itself each epoch: ``metrics.json`` (the history:
one row per epoch), ``metrics.csv`` (the same, flat), ``curves.png`` and, when the run is done,
``results.json`` (the reported test metrics and Δm%).

An epoch's row: ``epoch`` (1-based), ``lr``, ``train`` (mean training loss per task),
``conflict_ratio`` (the share of steps where some task's gradient conflicts with the mean
gradient), ``teleports``, ``rolled_back``, ``adapter_steps``, ``seconds`` (train, of which
teleport, and eval), ``test`` and, for CelebA, ``val`` (the split's metrics and mean losses), and
``delta_m`` (Δm% of the test metrics against the baselines, or None without them).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cost_fast.metrics import delta_m


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row of ``metrics.csv``: nested keys joined with '/'."""
    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{prefix}/{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    add("", row)
    return flat


def metrics_csv(history: Sequence[Mapping[str, Any]]) -> str:
    """The history as CSV, one line per epoch (the columns of every row, in first-seen order)."""
    rows = [flat_row(row) for row in history]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return out.getvalue()


def epoch_delta_m(
    test: Mapping[str, float], baselines: Mapping[str, float] | None, higher_is_better: Mapping[str, bool]
) -> float | None:
    """Δm% of one epoch's test metrics, or None without baselines."""
    if baselines is None:
        return None
    return delta_m({k: test[k] for k in higher_is_better}, baselines, higher_is_better)


def reported(
    history: Sequence[Mapping[str, Any]],
    rule: str,
    baselines: Mapping[str, float] | None,
    higher_is_better: Mapping[str, bool],
) -> dict[str, Any]:
    """``results.json``: the test metrics the experiment reports (``rule`` "last_10": their
    mean over the last 10 epochs, or all if fewer; "best_val": those of the epoch with the best
    mean validation F1) and their Δm% (Δm% is linear in the metrics, so the mean of the last
    epochs' Δm% is that of their mean)."""
    if rule == "last_10":
        chosen = list(history[-10:])
        test = {k: sum(row["test"][k] for row in chosen) / len(chosen) for k in chosen[-1]["test"]}
        how = f"the mean of the test metrics of epochs {chosen[0]['epoch']}-{chosen[-1]['epoch']}"
    else:
        best = max(history, key=lambda row: row["val"]["mean_f1"])
        test = dict(best["test"])
        how = f"the test metrics of epoch {best['epoch']}, the best mean validation F1"
    return {
        "reported": how,
        "test": test,
        "delta_m": epoch_delta_m(test, baselines, higher_is_better),
        "baselines": dict(baselines) if baselines is not None else None,
        "epochs": len(history),
        "teleports": sum(row["teleports"] for row in history),
    }


def curves_png(history: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> bytes:
    """The PNG of ``curves.png``: the training losses, the test metrics (at most 9: CelebA's mean F1
    instead of its 40), Δm% when there are baselines, and the teleports per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    shown = list(metric_names) if len(metric_names) <= 9 else ["mean_f1"]
    panels = ["train loss", *shown, *(["Δm%"] if history[-1]["delta_m"] is not None else []), "teleports"]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        if panel == "train loss":
            for task in history[0]["train"]:
                ax.plot(epochs, [row["train"][task] for row in history], label=task.removeprefix("loss/"))
            if len(history[0]["train"]) <= 5:
                ax.legend(fontsize=6)
        elif panel == "teleports":
            ax.bar(epochs, [row["teleports"] for row in history], color="tab:orange")
        elif panel == "Δm%":
            ax.plot(epochs, [row["delta_m"] for row in history], marker=".")
        else:
            ax.plot(epochs, [row["test"][panel] for row in history], marker=".")
        ax.set_title(panel if panel in ("train loss", "teleports", "Δm%") else f"test {panel}", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=6)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()
