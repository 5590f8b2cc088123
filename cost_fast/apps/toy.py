"""The two-task toy of CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent") that the COST
paper uses in its Figure 6: linear scalarization (LS) alone and LS + COST from five starting points.

With θ = (x1, x2), the two losses are

    f1 = c1(x2) · (log max(|0.5(-x1 - 7) - tanh(-x2)|, 5e-6) + 6) + c2(x2) · (((-x1 + 7)² + 0.1(-x2 - 8)²)/10 - 20)
    f2 = c1(x2) · (log max(|0.5(-x1 + 3) + tanh(-x2) + 2|, 5e-6) + 6) + c2(x2) · (((-x1 - 7)² + 0.1(-x2 - 8)²)/10 - 20)
    c1(x2) = max(tanh(x2/2), 0),   c2(x2) = max(tanh(-x2/2), 0).

COST needs a shared backbone with a layer to adapt, so θ is the output of a bias-free
``Linear(1, 2)`` (inside an ``nn.Sequential``) applied to the constant input 1 (its weight is θ); the rank-1 LoRA on it can move
θ anywhere in the plane. The Pareto front is computed numerically: the non-dominated (f1, f2)
of a dense grid over [-10, 10]². A run "reaches the front" if no grid point improves both of its
final losses by more than ``tolerance``.

Two protocols (``PROTOCOLS``): ``"nash-mtl"`` (default: the five starting points of the
Nash-MTL and FAMO toys, 3000 Adam steps at lr 0.01, seconds on a CPU) and ``"cagrad"`` (CAGrad's
own toy: its three starting points, 100000 Adam steps at lr 1e-3, minutes). The COST paper's
text does not list Fig. 6's starting points; CAGrad's protocol is the closest to its source.
Every attempted teleport is recorded, merged or rolled back (with the guard's reason), with its
level-set error (``cost_fast.teleport``: max_i |f_i(after) - f_i(before)| / max(|f_i(before)|,
1e-3)). ``level_set_tolerance`` makes every teleport loss-preserving (``TeleportConfig``): a
merged teleport then changed no loss by more than that share.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, TextIO

import torch
from torch import nn

from cost_fast.apps import signals
from cost_fast.apps.report import atomic_report_dir, check_report_target
from cost_fast.cost import COST
from cost_fast.methods import get_aggregator
from cost_fast.teleport import TeleportConfig, TeleportSchedule
from cost_fast.teleport.semantics import Semantics, get_semantics

INITS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
CAGRAD_INITS = [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)]
# protocol: (starting points, Adam steps, learning rate)
PROTOCOLS: dict[str, tuple[list[tuple[float, float]], int, float]] = {
    "nash-mtl": (INITS, 3000, 0.01),
    "cagrad": (CAGRAD_INITS, 100_000, 1e-3),
}
PATH_EVERY = 10  # toy.json keeps every 10th point of each trajectory (and the last); the plot uses all
LOWER = 5e-6


def toy_losses(theta: torch.Tensor) -> torch.Tensor:
    """(f1, f2) of the CAGrad toy (module docstring) for θ of shape (..., 2); shape (..., 2)."""
    x1, x2 = theta[..., 0], theta[..., 1]
    c1 = torch.tanh(x2 * 0.5).clamp_min(0)
    c2 = torch.tanh(-x2 * 0.5).clamp_min(0)
    log1 = (0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp_min(LOWER).log() + 6
    log2 = (0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp_min(LOWER).log() + 6
    sq1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    sq2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return torch.stack([log1 * c1 + sq1 * c2, log2 * c1 + sq2 * c2], dim=-1)


class ToyModel(nn.Module):
    """θ = backbone(1), a bias-free Linear(1, 2) whose weight is θ; no task heads."""

    def __init__(self, init: tuple[float, float]) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(1, 2, bias=False))
        with torch.no_grad():
            self.backbone[0].weight.copy_(torch.tensor(init, dtype=torch.float32).reshape(2, 1))
        self.heads = nn.ModuleList()

    @property
    def theta(self) -> torch.Tensor:
        """The current point (x1, x2)."""
        return self.backbone[0].weight.detach().reshape(2).clone()

    def task_losses(self, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        """(f1, f2) at θ = backbone(x) for the constant input x = [[1]]."""
        return toy_losses(self.backbone(x)[0])


def _loss_fn(model: ToyModel, batch: tuple[torch.Tensor, None]) -> torch.Tensor:
    return model.task_losses(batch[0])


def pareto_front(resolution: int = 501) -> torch.Tensor:
    """Non-dominated (f1, f2) pairs of a resolution x resolution grid over [-10, 10]², sorted by f1."""
    axis = torch.linspace(-10, 10, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    f = toy_losses(grid)
    f = f[torch.argsort(f[:, 0])]
    # sorted by f1, a point is non-dominated iff its f2 is below every earlier f2
    running_min = torch.cummin(f[:, 1], dim=0).values
    keep = torch.ones(len(f), dtype=torch.bool)
    keep[1:] = f[1:, 1] < running_min[:-1]
    return f[keep]


def reaches_front(losses: torch.Tensor, front: torch.Tensor, tolerance: float) -> bool:
    """True if no front point improves both losses by more than ``tolerance``."""
    better = (front[:, 0] < losses[0] - tolerance) & (front[:, 1] < losses[1] - tolerance)
    return not bool(better.any())


def train_toy(
    init: tuple[float, float],
    *,
    use_cost: bool,
    steps: int,
    lr: float,
    steps_per_epoch: int,
    semantics: str | Semantics = "public",
    seed: int = 0,
    teleport: TeleportConfig | None = None,
) -> dict[str, Any]:
    """One LS (mean of the two losses) or LS + COST run with Adam; returns the trajectory and
    every attempted teleport. ``teleport``: the teleport's settings (default
    ``TeleportConfig(lr=lr, rounds=20)``: 20 adapter steps at the training lr)."""
    torch.manual_seed(seed)
    model = ToyModel(init)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch = (torch.ones(1, 1), None)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mean"),
        optimizer,
        loss_fn=_loss_fn,
        teleport_data=[batch],
        semantics=semantics,
        schedule=TeleportSchedule(max_per_epoch=1 if use_cost else 0, steps_per_epoch=steps_per_epoch),
        teleport=TeleportConfig(lr=lr, rounds=20) if teleport is None else teleport,
        seed=seed,
    )
    path, teleports = [model.theta.tolist()], []
    for step in range(steps):
        signals.check()  # a signal whose exception was dropped ends the run here
        info = cost.step(_loss_fn(model, batch), batch)
        if info.attempted_teleport:
            teleports.append(
                {
                    "step": step,
                    "point": model.theta.tolist(),
                    "rolled_back": info.rolled_back,
                    "rollback_reason": info.rollback_reason,
                    "level_set_error": info.level_set_error,
                    "merged_fraction": info.merged_fraction,
                    "mean_grad_norm": info.mean_norm,  # ‖g0‖ at the point the teleport started from
                }
            )
        path.append(model.theta.tolist())
    final = toy_losses(torch.tensor(path[-1], dtype=torch.float64))
    return {"init": list(init), "path": path, "teleports": teleports, "final_losses": final.tolist()}


def merged_level_set_errors(run: dict[str, Any]) -> list[float]:
    """The level-set errors of a run's merged teleports."""
    return [t["level_set_error"] for t in run["teleports"] if not t["rolled_back"]]


def _plot(report: dict[str, Any], front: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = torch.linspace(-10, 10, 200)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    mean = toy_losses(grid).mean(-1)
    fig, (ax, ax_f, ax_e) = plt.subplots(1, 3, figsize=(18, 5))
    ax.contourf(grid[..., 0], grid[..., 1], mean, levels=30, cmap="Greys", alpha=0.6)
    for run in report["runs"]:
        for name, color, style in (("LS", "tab:blue", "--"), ("LS+COST", "tab:red", "-")):
            xy = torch.tensor(run[name]["path"])
            ax.plot(xy[:, 0], xy[:, 1], style, color=color, lw=1.5, label=name if run is report["runs"][0] else None)
            for t in run[name]["teleports"]:
                marker = "x" if t["rolled_back"] else "*"
                ax.plot(*t["point"], marker, color="gold", markersize=10, markeredgecolor="k")
        ax.plot(*run["LS"]["init"], "ko")
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title("trajectories over the mean loss (stars: teleports; crosses: rolled back)")
    ax.legend()
    ax_f.plot(front[:, 0], front[:, 1], "k-", lw=2, label="Pareto front (grid)")
    for run in report["runs"]:
        for name, color, marker in (("LS", "tab:blue", "s"), ("LS+COST", "tab:red", "o")):
            ax_f.plot(*run[name]["final_losses"], marker, color=color, markersize=8, alpha=0.8)
    ax_f.set_xlabel("f1")
    ax_f.set_ylabel("f2")
    ax_f.set_title("final losses (squares: LS, circles: LS+COST)")
    ax_f.legend()
    for k, run in enumerate(report["runs"]):
        for t in run["LS+COST"]["teleports"]:
            if t["level_set_error"] is not None:
                # a zero error (an adapter that did not move) is drawn at the axis' floor
                error = max(t["level_set_error"], 1e-8)
                ax_e.plot(k, error, "x" if t["rolled_back"] else "*", color="tab:red", markersize=8)
    if report["level_set_tolerance"] is not None:
        ax_e.axhline(report["level_set_tolerance"], color="k", ls="--", lw=1, label="level-set tolerance")
        ax_e.legend()
    ax_e.set_yscale("log")
    ax_e.set_xticks(range(len(report["runs"])))
    ax_e.set_xticklabels([str(tuple(run["LS"]["init"])) for run in report["runs"]], fontsize=8)
    ax_e.set_xlabel("start")
    ax_e.set_ylabel("max_i |f_i(after) - f_i(before)| / max(|f_i(before)|, 1e-3)")
    ax_e.set_title("level-set error of each teleport (stars: merged; crosses: rolled back)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_toy(
    out_dir: str = "toy_report",
    *,
    protocol: str = "nash-mtl",
    steps: int | None = None,
    lr: float | None = None,
    steps_per_epoch: int = 100,
    tolerance: float = 0.05,
    semantics: str = "public",
    seed: int = 0,
    level_set_tolerance: float | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """LS and LS + COST from the protocol's starting points (``steps`` and ``lr`` default to the
    protocol's; ``tolerance``: of ``reaches_front``; ``level_set_tolerance``: None merges every
    teleport's ΔW whole, a number makes the teleports loss-preserving, ``TeleportConfig``);
    writes toy.json, toy_table.md, toy.png."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    inits, default_steps, default_lr = PROTOCOLS[protocol]
    steps = default_steps if steps is None else steps
    lr = default_lr if lr is None else lr
    if steps < 1 or steps_per_epoch < 1 or not lr > 0 or not tolerance > 0:
        raise ValueError("steps and steps_per_epoch must be ≥ 1, lr and tolerance > 0")
    get_semantics(semantics)
    TeleportConfig(level_set_tolerance=level_set_tolerance)  # checks it before any run
    target = check_report_target(out_dir)
    start = time.perf_counter()
    front = pareto_front()
    runs = []
    for init in inits:
        entry = {}
        for name, use_cost in (("LS", False), ("LS+COST", True)):
            run = train_toy(
                init,
                use_cost=use_cost,
                steps=steps,
                lr=lr,
                steps_per_epoch=steps_per_epoch,
                semantics=semantics,
                seed=seed,
                teleport=TeleportConfig(lr=lr, rounds=20, level_set_tolerance=level_set_tolerance),
            )
            run["reaches_front"] = reaches_front(torch.tensor(run["final_losses"]), front, tolerance)
            entry[name] = run
        runs.append(entry)
        if stream is not None:
            print(
                f"init {init}: LS {'reaches' if entry['LS']['reaches_front'] else 'misses'} the front, "
                f"LS+COST {'reaches' if entry['LS+COST']['reaches_front'] else 'misses'} it "
                f"({len(entry['LS+COST']['teleports'])} attempted teleports)",
                file=stream,
                flush=True,
            )
    report = {
        "protocol": protocol,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "steps_per_epoch": steps_per_epoch,
        "tolerance": tolerance,
        "semantics": semantics,
        "level_set_tolerance": level_set_tolerance,
        "runs": runs,
        "wall_seconds": time.perf_counter() - start,
    }
    table = [
        "| start | LS final (f1, f2) | LS on the front | LS+COST final (f1, f2) | LS+COST on the front "
        "| teleports attempted (rolled back) | level-set error of the merged teleports: median, max |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ls, cost = run["LS"], run["LS+COST"]
        errors = merged_level_set_errors(cost)
        spread = f"{statistics.median(errors):.3g}, {max(errors):.3g}" if errors else "none merged"
        table.append(
            f"| {tuple(ls['init'])} | ({ls['final_losses'][0]:.3f}, {ls['final_losses'][1]:.3f}) | "
            f"{'yes' if ls['reaches_front'] else 'no'} | ({cost['final_losses'][0]:.3f}, {cost['final_losses'][1]:.3f}) | "
            f"{'yes' if cost['reaches_front'] else 'no'} | {len(cost['teleports'])} "
            f"({sum(t['rolled_back'] for t in cost['teleports'])}) | {spread} |"
        )

    def thinned(path: list) -> list:
        return path[::PATH_EVERY] + ([] if (len(path) - 1) % PATH_EVERY == 0 else path[-1:])

    saved = {
        **report,
        "path_every": PATH_EVERY,
        "runs": [{name: {**run[name], "path": thinned(run[name]["path"])} for name in run} for run in runs],
    }
    with atomic_report_dir(target) as folder:
        (folder / "toy.json").write_text(json.dumps(saved), encoding="utf-8")
        (folder / "toy_table.md").write_text("\n".join(table) + "\n", encoding="utf-8")
        _plot(report, front, str(folder / "toy.png"))
    if stream is not None:
        print("\n".join(table), file=stream)
        print(f"report: {target}/ (toy.json, toy_table.md, toy.png) in {report['wall_seconds']:.1f}s", file=stream)
    return report
