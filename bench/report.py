"""Tables (Markdown, to stdout) and PNG plots from the pytest-benchmark JSON files in bench/results/.

Usage:  python -m cost_fast.bench.report [bench/results/*.json ...]
Ratios are of medians measured side by side in the same run (same file).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BASELINES = {
    "gram": "plain_torch",
    "grads": "reference_loop",
    "solvers": "reference",
    "teleport": "reference",
    "adapter": "floor",
    "epoch": "base",
    "train": "base",
    "distributed": "naive_allreduce",
}


def load(path: Path) -> tuple[dict, dict[str, dict[str, float]]]:
    """Stamp and {group (the test name when ungrouped): {impl: median seconds}} of one result file."""
    data = json.loads(path.read_text())
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]][bench["extra_info"]["impl"]] = bench["stats"]["median"]
    return data.get("stamp", {}), groups


def launches_table(path: Path) -> str:
    """Markdown table of the launches suite: per workload and phase, the ops dispatched, the
    ops on host copies, the device reads and the median time."""
    data = json.loads(path.read_text())
    stamp = data.get("stamp", {})
    lines = [
        f"### {path.name}",
        f"{stamp.get('device')}; torch {stamp.get('torch')}, triton {stamp.get('triton')}; {stamp.get('date')}",
        "",
        "| workload | phase | ops | host ops | device reads | median (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        lines.append(
            f"| {info['workload']} | {info['impl']} | {info['ops']} | {info['host_ops']} | {info['reads']} | "
            f"{bench['stats']['median'] * 1e3:.2f} |"
        )
    return "\n".join(lines)


def table(path: Path) -> str:
    """Markdown table of medians and speed-ups over the baseline of each group (the launches
    suite: ``launches_table``)."""
    if path.stem.split("_")[0] == "launches":
        return launches_table(path)
    stamp, groups = load(path)
    baseline = BASELINES[path.stem.split("_")[0]]
    residuals = {
        (b["group"] or b["name"], b["extra_info"]["impl"]): b["extra_info"]["residual"]
        for b in json.loads(path.read_text())["benchmarks"]
        if "residual" in b["extra_info"]
    }
    lines = [
        f"### {path.name}",
        f"{stamp.get('device')}; torch {stamp.get('torch')}, triton {stamp.get('triton')}; {stamp.get('date')}",
        "",
        "| group | impl | median (ms) | speed-up vs " + baseline + " | residual |",
        "|---|---|---:|---:|---:|",
    ]
    for group, impls in groups.items():
        base = impls.get(baseline)
        for impl, median in sorted(impls.items(), key=lambda kv: -kv[1]):
            ratio = f"{base / median:.2f}x" if base else "n/a"
            res = residuals.get((group, impl))
            res_text = "" if res is None else f"{res:.1e}"
            lines.append(f"| {group} | {impl} | {median * 1e3:.3f} | {ratio} | {res_text} |")
    overhead = teleport_overhead(path)
    return "\n".join(lines) + ("\n\n" + overhead if overhead else "")


# Projected runs: this many epochs, a teleport every E epochs for each E here.
PROJECTED_EPOCHS = 200
TELEPORT_EVERY = (1, 5, 10)


def teleport_overhead(path: Path) -> str:
    """For epoch results that record it: per workload and row, the base and COST epochs, the
    teleports and adapter steps, one teleport in base epochs (t), and the overhead of a
    ``PROJECTED_EPOCHS``-epoch run with a teleport every E epochs: t / E (the base step of a
    COST epoch costs the same as the base method's). Empty for other results."""
    rows = [b for b in json.loads(path.read_text())["benchmarks"] if b["extra_info"].get("teleport_in_base_epochs")]
    if not rows:
        return ""
    base = {
        b["extra_info"]["workload"]: b["stats"]["median"]
        for b in json.loads(path.read_text())["benchmarks"]
        if b["extra_info"].get("impl") == "base"
    }
    every = " | ".join(f"every {e}" for e in TELEPORT_EVERY)
    lines = [
        f"Overhead of COST over a {PROJECTED_EPOCHS}-epoch run with a teleport every E epochs (projected "
        "from one teleport's measured cost):",
        "",
        f"| workload | row | base epoch (s) | COST epoch (s) | teleports | adapter steps | one teleport (base epochs) | {every} |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(TELEPORT_EVERY),
    ]
    for b in rows:
        info = b["extra_info"]
        t = info["teleport_in_base_epochs"]
        cells = " | ".join(f"{100 * t / e:+.1f}%" for e in TELEPORT_EVERY)
        lines.append(
            f"| {info['workload']} | {info['impl']} | {base.get(info['workload'], float('nan')):.3f} | "
            f"{b['stats']['median']:.3f} | {info['teleports']} | {info['adapter_steps']} | {t:.3f} | {cells} |"
        )
    return "\n".join(lines)


def plot(path: Path) -> Path:
    """Grouped bar chart of medians (the launches suite: op counts), log scale, saved next to
    the JSON as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamp, groups = load(path)
    counts = path.stem.split("_")[0] == "launches"  # the launches suite: ops, not times
    if counts:
        groups = defaultdict(dict)
        for bench in json.loads(path.read_text())["benchmarks"]:
            groups[bench["group"]][bench["extra_info"]["impl"]] = bench["extra_info"]["ops"]
    impls = sorted({impl for g in groups.values() for impl in g})
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + j * width for i, g in enumerate(names) if impl in groups[g]]
        ys = [groups[g][impl] * (1 if counts else 1e3) for g in names if impl in groups[g]]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([n.split(" ", 1)[-1] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("aten ops dispatched (log)" if counts else "median time per call (ms, log)")
    ax.set_title(f"{path.stem}: {stamp.get('device')}\ntorch {stamp.get('torch')}, {stamp.get('date')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv else sys.argv[1:])] or sorted(RESULTS.glob("*.json"))
    for path in paths:
        print(table(path), end="\n\n")
        print(f"plot: {plot(path)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
