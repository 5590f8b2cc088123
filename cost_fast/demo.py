"""The demo run (the README's main job): a small shared-backbone model trained on CPU with a base
multi-task method plus COST, printing per step the conflict statistics that drive the trigger
and, when COST teleports, what the teleport did.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TextIO

import torch

from cost_fast.aggregators.base import get_aggregator
from cost_fast.cost import COST
from cost_fast.grads import Mode
from cost_fast.models import MultiTaskMLP, conflicting_binary_tasks
from cost_fast.teleport import TeleportConfig


@dataclasses.dataclass
class DemoStep:
    """Statistics of one training step (host values, for printing and tests)."""

    step: int
    epoch: int
    mean_loss: float
    num_dominated: int
    num_conflicting_pairs: int
    min_cos_mean: float
    trigger: bool
    teleported: bool
    rolled_back: bool


def _loss_fn(model: MultiTaskMLP, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model.task_losses(x, y)


def run_demo(
    *,
    epochs: int = 4,
    steps_per_epoch: int = 10,
    num_tasks: int = 6,
    batch_size: int = 64,
    method: str = "fairgrad",
    use_cost: bool = True,
    mode: Mode = "loop",
    seed: int = 0,
    device: str = "cpu",
    out: TextIO | None = None,
) -> list[DemoStep]:
    """Train ``MultiTaskMLP`` (hidden width 8) on ``conflicting_binary_tasks`` with ``method``
    (any Gram-based aggregator name) and, unless ``use_cost=False``, COST (reference semantics,
    at most one teleport per epoch, teleport data = 4 training batches, 2 rounds); print one line
    per step and one per teleport to ``out``.
    """
    for name, value in (
        ("epochs", epochs),
        ("steps per epoch", steps_per_epoch),
        ("tasks", num_tasks),
        ("batch size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    torch.manual_seed(seed)
    in_features, steps = 16, epochs * steps_per_epoch
    x_all, y_all = conflicting_binary_tasks(steps_per_epoch * batch_size, in_features, num_tasks, seed=seed)
    batches = [
        (x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device))
        for i in range(0, steps_per_epoch * batch_size, batch_size)
    ]
    model = MultiTaskMLP(in_features, num_tasks, hidden=8).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator(method),
        optimizer,
        _loss_fn,
        batches[:4],
        max_teleports_per_epoch=1 if use_cost else 0,
        start_step=steps_per_epoch,  # let the first epoch settle before teleporting
        teleport=TeleportConfig(lr=1e-2, rounds=2),
        gradient_mode=mode,
        seed=seed,
    )

    def say(line: str) -> None:
        if out is not None:
            print(line, file=out, flush=True)

    say(
        f"cost_fast demo: {method}{' + COST' if use_cost else ''}, K={num_tasks} tasks, "
        f"P={sum(p.numel() for p in cost.adapter.base_parameters)} shared parameters, {epochs} epochs x "
        f"{steps_per_epoch} steps, device={device}"
    )
    say(f"{'epoch':>5} {'step':>5} {'loss':>8} {'dominated':>10} {'pairs':>6} {'min cos':>8} trigger")
    history: list[DemoStep] = []
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for epoch in range(epochs):
        for batch in batches:
            losses = _loss_fn(model, batch)
            info = cost.step(losses, batch)
            for key, value in info.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
            record = DemoStep(
                step=info.step,
                epoch=epoch,
                mean_loss=float(losses.detach().mean()),
                num_dominated=info.num_dominated,
                num_conflicting_pairs=info.num_conflicting_pairs,
                min_cos_mean=info.min_cos_mean,
                trigger=info.trigger,
                teleported=info.teleported,
                rolled_back=info.rolled_back,
            )
            history.append(record)
            say(
                f"{epoch:>5} {record.step:>5} {record.mean_loss:>8.4f} {record.num_dominated:>6}/{num_tasks:<3} "
                f"{record.num_conflicting_pairs:>6} {record.min_cos_mean:>8.3f} {'yes' if record.trigger else 'no'}"
            )
            if info.teleported or info.rolled_back:
                (lt0, lt1), (lg0, lg1) = info.task_term, info.sharpness_term
                verdict = "rolled back by the guard" if info.rolled_back else f"merged; HTR {info.htr}"
                sigma = "n/a" if info.sigma is None else f"{info.sigma:+.3f}"
                say(
                    f"      teleport: {info.teleport_steps} adapter steps, L_t {lt0:.2e} -> {lt1:.2e}, "
                    f"L_g {lg0:.2e} -> {lg1:.2e}, sigma {sigma}, {verdict}"
                )
        cost.end_epoch()
    total = time.perf_counter() - start
    teleports = sum(r.teleported for r in history)
    split = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(seconds.items()))
    say(
        f"done in {total:.1f}s: trigger fired on {sum(r.trigger for r in history)}/{steps} steps, "
        f"{teleports} teleports, {sum(r.rolled_back for r in history)} rolled back; time split: {split}"
    )
    return history
