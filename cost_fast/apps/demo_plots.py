"""The demo's plots: what each PNG shows, computed from the metrics alone (``plot_specs``, tested),
and the drawing of it (``draw``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def error_text(error: float | None) -> str:
    """A teleport's level-set error as the report prints it."""
    return "not measured" if error is None else f"{error:.2g}"


def plot_specs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each PNG of the report shows, from the metrics alone (tested; ``draw`` only draws
    it): per file, a title, axis labels, axis limits taken from the data, and the series."""
    runs = report["runs"]
    epochs = report["epochs"]
    tasks = runs["base"]["tasks"]
    accuracy = {name: run["test_accuracy"] for name, run in runs.items()}
    accuracy["single-task"] = report["single_task"]["test_accuracy"]
    accuracies = [a for values in accuracy.values() for a in values]
    low, high = min(accuracies), max(accuracies)
    margin = max(0.02, 0.1 * (high - low))
    events = runs["base+COST"]["teleports"]
    seconds = {name: run["seconds"] for name, run in runs.items()}
    return {
        "task_losses.png": {
            "title": "training loss per task",
            "xlabel": "epoch",
            "ylabel": "training loss (BCE)",
            "marker": "o" if epochs == 1 else None,  # one epoch is a point, not a line
            "tasks": tasks,
            "series": {name: run["train_loss"] for name, run in runs.items()},
        },
        "conflict_ratio.png": {
            "title": "conflict ratio per epoch",
            "xlabel": "epoch (dashed: an attempted teleport)",
            "ylabel": "share of steps with cos(g_i, g0) < 0",
            "ylim": (-0.02, 1.02),  # a share
            "series": {name: run["conflict_ratio"] for name, run in runs.items()},
            "events": [e["epoch"] for e in events],
        },
        "teleports.png": {
            "title": "L_t and L_g during each attempted teleport",
            "xlabel": "adapter step",
            "ylabel": ("L_t (loss invariance)", "L_g (sharpness)"),
            "series": {
                f"epoch {e['epoch']}, level-set error {error_text(e.get('level_set_error'))}"
                + (f" (rolled back: {e['rollback_reason']})" if e["rolled_back"] else ""): (
                    e["task_terms"],
                    e["sharpness_terms"],
                )
                for e in events
            },
        },
        "test_accuracy.png": {
            "title": "test accuracy per task (Δm% against the single-task models, lower is better: "
            + ", ".join(f"{name} {run['delta_m']:+.2f}" for name, run in runs.items())
            + ")",
            "xlabel": "task: is it this digit?",
            "ylabel": "test accuracy",
            "ylim": (max(0.0, low - margin), min(1.0, high + margin)),
            "tasks": tasks,
            "series": accuracy,
        },
        "time_split.png": {
            "title": "where the time went: one run each, wall clock (noisy; not a benchmark)",
            "xlabel": "seconds over the run",
            "ylabel": "",
            "series": seconds,
            "keys": ["gradients", "gram", "solve", "optimizer_step", "teleport"],
        },
    }


def draw(specs: dict[str, dict[str, Any]], folder: Path) -> None:
    """Draw ``plot_specs``' figures into ``folder`` as PNG files (matplotlib, no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"base": "tab:blue", "base+COST": "tab:red", "single-task": "tab:gray"}

    spec = specs["task_losses.png"]
    fig, axes = plt.subplots(2, 5, figsize=(14, 5.5), sharex=True)
    for task, ax in enumerate(axes.flat):
        for name, losses in spec["series"].items():
            ax.plot([e[task] for e in losses], color=colors[name], label=name, marker=spec["marker"])
        ax.set_title(spec["tasks"][task], fontsize=9)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    fig.suptitle(spec["title"])
    fig.supxlabel(spec["xlabel"])
    fig.supylabel(spec["ylabel"])
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(folder / "task_losses.png", dpi=100)
    plt.close(fig)

    spec = specs["conflict_ratio.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ratio in spec["series"].items():
        ax.plot(ratio, marker="o", color=colors[name], label=name)
    for epoch in spec["events"]:
        ax.axvline(epoch, color="tab:red", alpha=0.25, linestyle="--")
    ax.set(title=spec["title"], xlabel=spec["xlabel"], ylabel=spec["ylabel"], ylim=spec["ylim"])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(folder / "conflict_ratio.png", dpi=100)
    plt.close(fig)

    spec = specs["teleports.png"]
    fig, (ax_t, ax_g) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (label, (task_terms, sharp_terms)) in enumerate(spec["series"].items()):
        color = plt.cm.viridis(i / max(1, len(spec["series"]) - 1))
        ax_t.plot(task_terms, label=label, color=color, marker="o" if len(task_terms) == 1 else None)
        ax_g.plot(sharp_terms, label=label, color=color, marker="o" if len(sharp_terms) == 1 else None)
    for ax, ylabel in zip((ax_t, ax_g), spec["ylabel"]):
        ax.set(xlabel=spec["xlabel"], ylabel=ylabel)
    fig.suptitle(spec["title"])
    if spec["series"]:
        ax_g.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_t.text(0.5, 0.5, "no teleport", ha="center", transform=ax_t.transAxes)
    fig.tight_layout()
    fig.savefig(folder / "teleports.png", dpi=100)
    plt.close(fig)

    spec = specs["test_accuracy.png"]
    fig, ax = plt.subplots(figsize=(10, 4))
    # points, not bars: the axis starts where the data does, and a bar would exaggerate the gap
    offsets = ((-0.15, "o"), (0.0, "s"), (0.15, "^"))
    for (offset, marker), (name, accuracy) in zip(offsets, spec["series"].items()):
        ax.plot([t + offset for t in range(len(spec["tasks"]))], accuracy, marker, color=colors[name], label=name)
    ax.set_xticks(range(len(spec["tasks"])), spec["tasks"], fontsize=8)
    ax.set(title=spec["title"], xlabel=spec["xlabel"], ylabel=spec["ylabel"], ylim=spec["ylim"])
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(folder / "test_accuracy.png", dpi=100)
    plt.close(fig)

    spec = specs["time_split.png"]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    left = {name: 0.0 for name in spec["series"]}
    for k, key in enumerate(spec["keys"]):
        for name, seconds in spec["series"].items():
            value = seconds.get(key, 0.0)
            ax.barh(name, value, left=left[name], label=key if name == "base" else None, color=plt.cm.tab10(k))
            left[name] += value
    ax.set(title=spec["title"], xlabel=spec["xlabel"])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(folder / "time_split.png", dpi=100)
    plt.close(fig)
