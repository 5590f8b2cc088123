"""The README's example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_mtl_step_example_trains() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "get_aggregator(" in b and "engine.combine(w)" in b)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    final = model.task_losses(x, y).detach()
    assert torch.isfinite(final).all()
    assert final.mean() < 0.1  # from ~0.69 (chance) at initialization; ~0.01 measured
    w = namespace["w"]
    assert w.shape == (4,) and (w > 0).all()


def test_readme_cost_example_runs() -> None:
    from cost_fast.models import MultiTaskMLP, conflicting_binary_tasks

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "COST(" in b)
    torch.manual_seed(0)
    x, y = conflicting_binary_tasks(128, in_features=16, num_tasks=4)
    model = MultiTaskMLP(16, num_tasks=4, hidden=8)
    namespace = {"torch": torch, "model": model, "epochs": 2, "train_batches": [(x[:64], y[:64]), (x[64:], y[64:])]}
    exec(compile(example, "README.md", "exec"), namespace)
    cost = namespace["cost"]
    assert cost.step_count == 4 and cost.epoch == 2  # epochs counted by COST (len(train_batches) steps)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_readme_own_optimizer_step_example_trains() -> None:
    from cost_fast import COST, get_aggregator
    from cost_fast.models import MultiTaskMLP, conflicting_binary_tasks

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "cost.backward(" in b)
    torch.manual_seed(0)
    x, y = conflicting_binary_tasks(256, in_features=16, num_tasks=4)
    model = MultiTaskMLP(16, num_tasks=4, hidden=8)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]

    def loss_fn(model, batch):
        return model.task_losses(*batch)

    first = torch.stack([loss_fn(model, b) for b in batches]).mean().detach()
    namespace = {
        "torch": torch,
        "COST": COST,
        "get_aggregator": get_aggregator,
        "model": model,
        "epochs": 3,
        "train_batches": batches,
        "loss_fn": loss_fn,
    }
    exec(compile(example, "README.md", "exec"), namespace)
    cost, optimizer = namespace["cost"], namespace["optimizer"]
    assert cost.step_count == 3 * len(batches) and cost.epoch == 3
    assert optimizer.state and all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.stack([loss_fn(model, b) for b in batches]).mean() < first  # it trained
