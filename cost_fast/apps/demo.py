"""``cost-fast demo``, the README's main job: a base multi-task method with and without COST on a
real data set that works offline, with a report folder of metrics and plots.

Data: scikit-learn's 8x8 handwritten digits (shipped inside the package; no download), cast as
10 one-vs-rest binary tasks ("is it a 3?"), the way CelebA is 40 binary attributes; a fixed
80/20 train/test split; pixels standardized. Model: ``MultiTaskMLP`` (64 inputs, a narrow shared
backbone so that tasks compete for it, one linear head per digit). Both runs start from the same
weights and see the same batches; COST uses the whole training set as teleport data, as the
public code does. The tasks are named ``digit_0`` ... ``digit_9`` (the losses go to COST as a
dict, and the names reach the metrics and plots). One single-task model per digit (the same
network with one head, trained alone with Adam on its own loss, same epochs and batches) gives the
baselines of Δm% (``cost_fast.metrics.delta_m`` over the test accuracies, higher is better), which
the report gives for both multi-task runs.

Report folder (written at once, see ``cost_fast.apps.report``): ``metrics.json`` (with per-step
statistics: min cos(g_i, g0), conflicting pairs, ‖g0‖) and PNG plots of
the per-task training losses, the conflict ratio per epoch (share of steps where some task's
gradient conflicts with the mean gradient, cos(g_i, g0) < 0) with and without COST, the
teleport events, L_t and L_g during each attempted teleport (merged or rolled back, with the
reason), the test accuracy per task (axis from the data), and the time split of the one run
(per-task gradients, Gram statistics, solve, optimizer step, teleport; labelled as one noisy
wall-clock run, not a benchmark). What each plot shows is computed by ``plot_specs``
(``cost_fast.apps.demo_plots``).
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

import torch

from cost_fast.apps import signals
from cost_fast.apps.demo_plots import draw, error_text, plot_specs
from cost_fast.apps.report import atomic_report_dir, check_report_target
from cost_fast.cost import COST
from cost_fast.methods import get_aggregator
from cost_fast.metrics import delta_m
from cost_fast.models import MultiTaskMLP, batch_task_losses
from cost_fast.step import BaseStepConfig
from cost_fast.teleport.schedule import TeleportSchedule
from cost_fast.teleport.semantics import get_semantics

NUM_TASKS = 10
TASK_NAMES = tuple(f"digit_{d}" for d in range(NUM_TASKS))
TELEPORTS = ("lora", "loha", "rescale")  # COST(adapter=...)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        signals.check()  # a signal in the middle of the import is not a missing package
        raise RuntimeError(f"the demo needs {module}: pip install 'cost_fast[demo]'") from None


def digits_tasks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): standardized 8x8 digits and their 10 one-vs-rest labels."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.nn.functional.one_hot(torch.tensor(digits.target), NUM_TASKS).float()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


def train(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    method: str,
    semantics: str,
    use_cost: bool,
    hidden: int,
    seed: int,
    gradients: str = "exact",
    teleport: str = "lora",
    progress: Any = None,
) -> dict[str, Any]:
    """One training run; returns its metrics (plain Python values)."""
    torch.manual_seed(seed)
    model = MultiTaskMLP(batches[0][0].shape[1], NUM_TASKS, hidden=hidden).to(batches[0][0].device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    cost = COST(
        model,
        model.backbone,
        get_aggregator(method),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches,
        semantics=semantics,
        schedule=TeleportSchedule(start_epoch=1, max_per_epoch=1 if use_cost else 0),
        base_step=BaseStepConfig(gradient_mode="representation" if gradients == "representation" else "loop"),
        adapter=teleport,
        seed=seed,
    )
    losses_per_epoch, conflict_ratio, teleports, step_stats = [], [], [], []
    task_names: tuple[str, ...] | None = None
    seconds: dict[str, float] = {}
    for epoch in range(epochs):
        epoch_losses = torch.zeros(NUM_TASKS)
        conflicted = 0
        for batch in batches:
            signals.check()  # a signal whose exception was dropped ends the run here
            losses = batch_task_losses(model, batch)
            info = cost.step(dict(zip(TASK_NAMES, losses.unbind())), batch)
            task_names = info.task_names
            epoch_losses += losses.detach().cpu()
            conflicted += info.min_cos_mean < 0
            step_stats.append([info.step, info.min_cos_mean, info.num_conflicting_pairs, info.mean_norm])
            for key, value in info.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
            if info.attempted_teleport:
                teleports.append(
                    {
                        "epoch": epoch,
                        "step": info.step,
                        "rolled_back": info.rolled_back,
                        "rollback_reason": info.rollback_reason,
                        "symmetry": info.symmetry,
                        "sigma": info.sigma,
                        "htr": info.htr,
                        "task_terms": info.task_terms,
                        "sharpness_terms": info.sharpness_terms,
                        "level_set_error": info.level_set_error,
                        "merged_fraction": info.merged_fraction,
                    }
                )
            if progress is not None:
                progress.update(1)
        losses_per_epoch.append((epoch_losses / len(batches)).tolist())
        conflict_ratio.append(conflicted / len(batches))
    accuracy = _test_accuracy(model, *test)
    return {
        "tasks": list(task_names),
        "train_loss": losses_per_epoch,
        "conflict_ratio": conflict_ratio,
        "teleports": teleports,
        "test_accuracy": accuracy,
        "seconds": seconds,
        "steps": step_stats,  # per step: [step, min cos(g_i, g0), conflicting pairs, ‖g0‖]
    }


def train_single_task(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    task: int,
    *,
    epochs: int,
    hidden: int,
    seed: int,
    progress: Any = None,
) -> float:
    """The single-task baseline of ``task``: the demo's network with one head, trained alone on
    that task's loss (Adam, the same learning rate, epochs and batches); its test accuracy."""
    torch.manual_seed(seed)
    model = MultiTaskMLP(batches[0][0].shape[1], 1, hidden=hidden).to(batches[0][0].device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in batches:
            signals.check()
            optimizer.zero_grad()
            model.task_losses(x, y[:, task : task + 1]).sum().backward()
            optimizer.step()
            if progress is not None:
                progress.update(1)
    x_test, y_test = test
    return _test_accuracy(model, x_test, y_test[:, task : task + 1])[0]


def _test_accuracy(model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per head, the share of samples whose sign of the logit matches the 0/1 label (eval mode,
    no grad)."""
    model.eval()
    with torch.no_grad():
        return ((model(x) > 0).float() == y).float().mean(0).tolist()


def run_demo(
    out_dir: str = "demo_report",
    *,
    epochs: int = 10,
    method: str = "fairgrad",
    semantics: str = "public",
    hidden: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    gradients: str = "exact",
    teleport: str = "lora",
    stream: TextIO | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``method`` alone and with COST on the digits tasks; write the report folder.

    ``gradients``: ``"exact"`` (per-task gradients of the shared parameters) or
    ``"representation"`` (of the backbone's output; ``BaseStepConfig(gradient_mode="representation")``).
    ``teleport``: ``"lora"`` (default), ``"loha"`` or ``"rescale"`` (``COST(adapter=...)``;
    ``"rescale"`` is the group-action teleport of ``cost_fast.teleport.rescaling``).
    ``stream``: where the progress bar and the summary go (None: silent)."""
    for name, value in (("epochs", epochs), ("hidden", hidden), ("batch size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    get_semantics(semantics)  # a clear error for an unknown name, before any work
    if gradients not in ("exact", "representation"):
        raise ValueError(f"gradients must be 'exact' or 'representation', got {gradients!r}")
    if teleport not in TELEPORTS:
        raise ValueError(f"teleport must be one of {TELEPORTS}, got {teleport!r}")
    target = check_report_target(out_dir)
    _require("matplotlib")
    x_train, y_train, x_test, y_test = (t.to(device) for t in digits_tasks(seed))
    batches = [(x_train[i : i + batch_size], y_train[i : i + batch_size]) for i in range(0, len(x_train), batch_size)]
    bar = None
    if progress and stream is not None:
        tqdm = _require("tqdm").tqdm
        total = (2 + NUM_TASKS) * epochs * len(batches)  # two multi-task runs, one single-task run per task
        bar = tqdm(total=total, desc=f"{method}, {method}+COST, single-task", unit="step", file=stream)
    start = time.perf_counter()
    runs = {}
    for name, use_cost in (("base", False), ("base+COST", True)):
        runs[name] = train(
            batches,
            (x_test, y_test),
            epochs=epochs,
            method=method,
            semantics=semantics,
            use_cost=use_cost,
            hidden=hidden,
            seed=seed,
            gradients=gradients,
            teleport=teleport,
            progress=bar,
        )
    baselines = [
        train_single_task(batches, (x_test, y_test), task, epochs=epochs, hidden=hidden, seed=seed, progress=bar)
        for task in range(NUM_TASKS)
    ]
    higher_is_better = dict.fromkeys(TASK_NAMES, True)
    for run in runs.values():
        run["delta_m"] = delta_m(
            dict(zip(TASK_NAMES, run["test_accuracy"])), dict(zip(TASK_NAMES, baselines)), higher_is_better
        )
    if bar is not None:
        bar.close()
    report = {
        "data": "scikit-learn digits, 10 one-vs-rest tasks",
        "method": method,
        "semantics": semantics,
        "gradients": gradients,
        "teleport": teleport,
        "epochs": epochs,
        "batch_size": batch_size,
        "hidden": hidden,
        "seed": seed,
        "device": device,
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "wall_seconds": time.perf_counter() - start,
        "runs": runs,
        "single_task": {"test_accuracy": baselines},
    }
    with atomic_report_dir(target) as folder:
        (folder / "metrics.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        draw(plot_specs(report), folder)
    if stream is not None:
        for name, run in runs.items():
            acc = sum(run["test_accuracy"]) / NUM_TASKS
            kinds = [
                ("rolled back" if e["rolled_back"] else f"HTR {e['htr']}")
                + f", level-set error {error_text(e.get('level_set_error'))}"
                for e in run["teleports"]
            ]
            print(
                f"{name:>10}: mean test accuracy {acc:.4f}, final train loss "
                f"{sum(run['train_loss'][-1]) / NUM_TASKS:.4f}, conflict ratio (last epoch) "
                f"{run['conflict_ratio'][-1]:.2f}, Δm% {run['delta_m']:+.2f}, teleports {len(kinds)}{' (' + ', '.join(kinds) + ')' if kinds else ''}",
                file=stream,
            )
        single = sum(baselines) / NUM_TASKS
        print(
            f"{'single-task':>10}: mean test accuracy {single:.4f} (one model per task: the baselines of Δm%)",
            file=stream,
        )
        print(
            f"report: {target}/ (metrics.json, task_losses.png, conflict_ratio.png, teleports.png, "
            f"test_accuracy.png, time_split.png) in {report['wall_seconds']:.1f}s",
            file=stream,
        )
    return report


__all__ = ["TASK_NAMES", "digits_tasks", "plot_specs", "run_demo", "train", "train_single_task"]
