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


def test_readme_mtl_backward_example_trains() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "mtl_backward(losses" in b)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    final = model.task_losses(x, y).detach()
    assert torch.isfinite(final).all() and final.mean() < 0.2  # from ~0.69 (chance) at initialization
    weights = namespace["result"].weights
    assert weights.shape == (4,) and (weights > 0).all()


def test_readme_plug_in_method_runs_alone_and_under_cost() -> None:
    from cost_fast import COST, mtl_backward
    from cost_fast.aggregators.base import REGISTRY
    from cost_fast.models import MultiTaskMLP, batch_task_losses, conflicting_binary_tasks

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    example = next(b for b in blocks if "class InverseNorm(Aggregator)" in b)
    namespace: dict = {"torch": torch}
    try:
        exec(compile(example, "README.md", "exec"), namespace)
        gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
        torch.testing.assert_close(namespace["InverseNorm"]().weights(gram), torch.tensor([1 / 3, 2 / 3]))
        torch.manual_seed(0)
        x, y = conflicting_binary_tasks(64, in_features=8, num_tasks=3)
        model = MultiTaskMLP(8, num_tasks=3, hidden=16)
        result = mtl_backward(model.task_losses(x, y), model.backbone, "inverse_norm")
        norms = result.stats.norms.double()
        torch.testing.assert_close(result.weights.double(), (1 / norms) / (1 / norms).sum(), rtol=1e-5, atol=0)
        batches = [(x[:32], y[:32]), (x[32:], y[32:])]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        cost = COST(model, model.backbone, "inverse_norm", optimizer, loss_fn=batch_task_losses, teleport_data=batches)
        for batch in batches * 2:
            assert cost.step(batch_task_losses(model, batch), batch).skipped is None
    finally:
        REGISTRY.pop("inverse_norm", None)
