"""The problems several tests share. ``Tug``: a shared backbone pulled toward four targets by four
tasks (some task always opposes the mean gradient once trained a little, so COST's trigger
fires), plus one linear head per task so that the heads' update is checked too; ``TugOfWar``:
one shared output and no heads; ``mlp_setup``: a ``MultiTaskMLP`` on conflicting binary tasks.
And the builders of a COST over them (``build``, ``make_cost``) and state comparisons."""

from __future__ import annotations

import dataclasses

import torch

from cost_fast import COST, TeleportConfig, TeleportSchedule
from cost_fast.models import MultiTaskMLP, batch_task_losses

K = 4
TARGETS = (1.0, -1.0, 1.5, -2.0)


class Tug(torch.nn.Module):
    """Backbone Linear(6, 8) - Tanh - Linear(8, 3); head i: Linear(3, 1);
    L_i = mean_b (head_i(h) - t_i)² + mean_b (Σ_j h_j - t_i)²."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(K))

    def task_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        out = torch.cat([head(h) for head in self.heads], dim=1)
        return ((out - targets) ** 2).mean(dim=0) + (h.sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


def tug_batches(
    seed: int, count: int, dtype: torch.dtype = torch.float32, size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``size`` inputs drawn from a generator seeded ``seed``, with the targets."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor(TARGETS, dtype=dtype)
    return [(torch.randn(size, 6, generator=gen, dtype=dtype), targets.expand(size, K)) for _ in range(count)]


def make_method(name: str):
    """The registered method ``name``, built for K tasks when it is a loss weighting."""
    from cost_fast import get_aggregator, list_aggregators

    return get_aggregator(name, num_tasks=K) if list_aggregators()[name] == "loss" else get_aggregator(name)


def build(name="fairgrad", *, seed: int = 0, dtype=torch.float64, optimizer=torch.optim.Adam, **kwargs):
    """A Tug model, its batches, its method (a name or an object), an optimizer over both and
    COST (teleports off unless a schedule asks; 4 steps per epoch unless it says)."""
    torch.manual_seed(seed)
    model = Tug().to(dtype)
    batches = tug_batches(seed, 4, dtype)
    method = make_method(name) if isinstance(name, str) else name
    params = list(model.parameters()) + (list(method.parameters()) if isinstance(method, torch.nn.Module) else [])
    opt = optimizer(params, lr=1e-2)
    schedule = kwargs.pop("schedule", TeleportSchedule(max_per_epoch=0))
    if schedule.steps_per_epoch is None:
        schedule = dataclasses.replace(schedule, steps_per_epoch=4)
    kwargs.setdefault("teleport_data", batches[:2])
    kwargs.setdefault("teleport", TeleportConfig(rounds=1))
    kwargs.setdefault("loss_fn", batch_task_losses)
    cost = COST(model, model.backbone, method, opt, schedule=schedule, **kwargs)
    return model, batches, cost, opt


def same_state(a, b) -> bool:
    """Two state dicts hold the same values (tensors bit for bit, nested dicts and lists alike)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def mlp_setup(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A MultiTaskMLP over 8 inputs and 4 batches of 16 where tasks 0/1 agree and 2/3 are their
    opposites: strong conflicts with the mean gradient."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen, dtype=dtype)
    u = torch.randn(8, generator=gen, dtype=dtype)
    # tasks 0/1 agree, 2/3 are their opposites: strong conflicts with the mean gradient
    y = torch.stack([x @ u > 0, x @ u > 0.3, x @ u < 0, x @ u < -0.3], dim=1).to(dtype)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = MultiTaskMLP(8, K, hidden=16).to(dtype)
    return model, batches


class TugOfWar(torch.nn.Module):
    """One shared output pulled toward K different targets: some task always opposes the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.heads = torch.nn.ModuleList()

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        targets = torch.tensor([1.0, -1.0, 1.5, -2.0])
        return ((self.backbone(x) - targets) ** 2).mean(dim=0)


def tug_setup(seed: int = 0):
    """``TugOfWar`` and 4 batches of 16 (targets unused: the model has its own)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 8, generator=gen), torch.zeros(16, K)) for _ in range(4)]
    return TugOfWar(), batches


def make_cost(model, batches, base="fairgrad", *, extra_params=(), schedule=None, **kwargs):
    """COST over ``model`` and an Adam optimizer; an epoch is ``len(batches)`` steps unless the
    schedule says otherwise (or the teleport data has no length)."""
    base = make_method(base) if isinstance(base, str) else base
    params = list(model.parameters()) + (list(base.parameters()) if isinstance(base, torch.nn.Module) else [])
    optimizer = torch.optim.Adam(params + list(extra_params), lr=1e-2)
    kwargs.setdefault("teleport", TeleportConfig(rounds=1, guard_tolerance=1e9))
    kwargs.setdefault("teleport_data", batches[:2])
    schedule = schedule if schedule is not None else TeleportSchedule()
    if schedule.steps_per_epoch is None and hasattr(kwargs["teleport_data"], "__len__"):
        schedule = dataclasses.replace(schedule, steps_per_epoch=len(batches))
    cost = COST(model, model.backbone, base, optimizer, loss_fn=batch_task_losses, schedule=schedule, **kwargs)
    return cost, optimizer


def assert_same_state(a, b, where: str) -> None:
    """Two states alike, floats to rtol 1e-9 (float64 runs), everything else exactly."""
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where
