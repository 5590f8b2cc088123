"""Where the teleport leaves the loss level set on CAGrad's toy, and what keeps it there.

    python -m cost_fast.bench.toy_level_set OUT_FOLDER [--steps N]

Runs LS + COST (``cost_fast.apps.toy``, the nash-mtl protocol: 5 starts, 3000 Adam steps at lr 0.01,
at most one teleport per 100 steps, seed 0) under teleports that differ in one setting each:

- ``public``: the public code's objective 10 L_t - 0.5 L_g, 20 adapter steps at lr 0.01, the
  trained ΔW merged whole (what ``cost-fast toy`` runs);
- ``public_no_sharpness``: the same with L_g's weight 0;
- ``public_task_weight_1000``: L_t's weight 1000 instead of 10 (an L_t that dominates);
- ``public_adapter_lr_1e-3``: the adapter's learning rate 1e-3 instead of 0.01;
- ``public_level_set_0.05``: ``TeleportConfig(level_set_tolerance=0.05)``, the loss-preserving
  teleport;
- ``paper`` and ``paper_level_set_0.05``: the paper's semantics (guard on), without and with it.

Each teleport is recorded with its level-set error e = max_i |f_i(after) - f_i(before)| /
max(|f_i(before)|, 1e-3), the share of ΔW merged, and ‖g0‖ where it started; each variant with
the median and largest e of its merged teleports, the share above 5%, and whether each start
reaches the Pareto front (LS alone: ``ls_reaches_front``). Writes ``toy_level_set_cpu.json``
(stamped with device, versions and date) and ``toy_level_set_cpu.md`` (a table of the summaries)
into OUT_FOLDER, which must be new, empty or a folder cost-fast wrote before
(``cost_fast.apps.report.MARKER``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from cost_fast.apps.report import check_report_target, mark
from cost_fast.apps.toy import INITS, merged_level_set_errors, pareto_front, reaches_front, train_toy
from cost_fast.bench.stamp import stamp
from cost_fast.teleport import TeleportConfig
from cost_fast.teleport.semantics import PaperSemantics, PublicSemantics, Semantics

LR, STEPS, STEPS_PER_EPOCH, ROUNDS, SHARE = 0.01, 3000, 100, 20, 0.05

VARIANTS: dict[str, tuple[Semantics, TeleportConfig]] = {
    "public": (PublicSemantics(), TeleportConfig(lr=LR, rounds=ROUNDS)),
    "public_no_sharpness": (PublicSemantics(sharpness_weight=0.0), TeleportConfig(lr=LR, rounds=ROUNDS)),
    "public_task_weight_1000": (PublicSemantics(task_weight=1000.0), TeleportConfig(lr=LR, rounds=ROUNDS)),
    "public_adapter_lr_1e-3": (PublicSemantics(), TeleportConfig(lr=1e-3, rounds=ROUNDS)),
    "public_level_set_0.05": (PublicSemantics(), TeleportConfig(lr=LR, rounds=ROUNDS, level_set_tolerance=SHARE)),
    "paper": (PaperSemantics(), TeleportConfig(lr=LR, rounds=ROUNDS)),
    "paper_level_set_0.05": (PaperSemantics(), TeleportConfig(lr=LR, rounds=ROUNDS, level_set_tolerance=SHARE)),
}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and largest level-set error of the merged teleports of ``runs``, the share above
    ``SHARE``, and the median error of those that started above and below the median ‖g0‖."""
    merged = [t for run in runs for t in run["teleports"] if not t["rolled_back"]]
    errors = [e for run in runs for e in merged_level_set_errors(run)]
    out: dict[str, Any] = {
        "attempted": sum(len(run["teleports"]) for run in runs),
        "merged": len(merged),
        "median_error": statistics.median(errors) if errors else None,
        "max_error": max(errors) if errors else None,
        "share_above_0.05": sum(e > SHARE for e in errors) / len(errors) if errors else None,
    }
    if len(merged) >= 2:
        middle = statistics.median(t["mean_grad_norm"] for t in merged)
        steep = [t["level_set_error"] for t in merged if t["mean_grad_norm"] > middle]
        flat = [t["level_set_error"] for t in merged if t["mean_grad_norm"] <= middle]
        out["median_error_steep_half"] = statistics.median(steep) if steep else None
        out["median_error_flat_half"] = statistics.median(flat) if flat else None
    return out


def table(result: dict[str, Any]) -> str:
    """The variants' summaries as a markdown table."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    def starts(reached: list[bool]) -> str:
        return ", ".join(str(tuple(init)) for init, ok in zip(INITS, reached) if ok) or "none"

    lines = [
        f"LS + COST on CAGrad's toy ({result['stamp']['date']}, {result['stamp']['device']}, torch "
        f"{result['stamp']['torch']}): {result['protocol']['steps']} Adam steps per start at lr {LR}. LS alone "
        f"reaches the front from {starts(result['ls_reaches_front'])}.",
        "",
        "| variant | teleports attempted (merged) | level-set error of the merged: median | max | share > 5% "
        "| median, steeper half (‖g0‖) | median, flatter half | starts that reach the front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, variant in result["variants"].items():
        s = variant["summary"]
        lines.append(
            f"| {name} | {s['attempted']} ({s['merged']}) | {number(s['median_error'])} | {number(s['max_error'])} "
            f"| {number(s['share_above_0.05'])} | {number(s.get('median_error_steep_half'))} "
            f"| {number(s.get('median_error_flat_half'))} | {starts(variant['reaches_front'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cost_fast.bench.toy_level_set", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="report folder (bench/results)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"Adam steps per run (default {STEPS})")
    args = parser.parse_args(argv)
    try:
        folder = check_report_target(args.out, merge=True)
    except ValueError as err:
        parser.error(str(err))
    front = pareto_front()
    common = {"steps": args.steps, "lr": LR, "steps_per_epoch": STEPS_PER_EPOCH, "seed": 0}
    ls = [train_toy(init, use_cost=False, **common) for init in INITS]
    result: dict[str, Any] = {
        "stamp": stamp(torch.device("cpu")),
        "protocol": {**common, "starts": INITS, "adapter_rounds": ROUNDS, "front_tolerance": 0.05},
        "ls_reaches_front": [reaches_front(torch.tensor(r["final_losses"]), front, 0.05) for r in ls],
        "variants": {},
    }
    for name, (semantics, config) in VARIANTS.items():
        start = time.perf_counter()
        runs = [train_toy(init, use_cost=True, semantics=semantics, teleport=config, **common) for init in INITS]
        result["variants"][name] = {
            "semantics": {"name": semantics.name, **vars(semantics)},
            "adapter_lr": config.lr,
            "level_set_tolerance": config.level_set_tolerance,
            "summary": summary(runs),
            "reaches_front": [reaches_front(torch.tensor(r["final_losses"]), front, 0.05) for r in runs],
            "final_losses": [r["final_losses"] for r in runs],
            "teleports": [r["teleports"] for r in runs],
        }
        print(f"{name}: {result['variants'][name]['summary']} ({time.perf_counter() - start:.0f}s)", flush=True)
    folder.mkdir(exist_ok=True)
    mark(folder, [])
    path = folder / "toy_level_set_cpu.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    (folder / "toy_level_set_cpu.md").write_text(table(result), encoding="utf-8")
    mark(folder, [path.name, "toy_level_set_cpu.md"])
    print(f"wrote {path} and toy_level_set_cpu.md")


if __name__ == "__main__":
    main()
