"""Epoch time where COST costs: base FairGrad against FairGrad + COST (fast engine, two teleport
schedules) and the yardstick, every row checked to do the same work.

Two workloads whose tasks really conflict: CelebA-shaped (``CelebACNN``, 40 binary tasks whose
labels are signs of independent random projections of the image, so that they compete for the
backbone; CPU: width 8, batch 8; GPU: width 64, batch 64) and NYUv2-shaped (``SegNetMTL``,
segmentation + depth + normals on synthetic 32x32 images; CPU: width 8, batch 8; GPU: width 32,
batch 32). Each is first trained with FairGrad until COST's public trigger holds (once per
workload, shared by every row), and every epoch starts from that same state.

Schedules: ``public`` (the public code's: the teleport runs ``rounds`` = 2 passes over the
epoch's whole loader) and ``budget`` (at most 8 adapter steps). Rows: ``base`` (no teleport),
``cost_fast`` and ``cost_fast_budget`` (``COST``), ``cost_reference`` (``YardstickCOST``, the
public schedule; the row id is kept from earlier results). One epoch = ``STEPS`` steps, at most
one teleport. Each COST row records its teleports and adapter steps, and a row whose work differs
from the other rows of its workload and schedule fails: a mismatch is an error, not a row.
``extra_info["teleport_in_base_epochs"]`` is (COST epoch - base epoch) / teleports / base epoch,
measured in the same run; ``teleport_in_base_epochs_paired`` is the same from epochs run back to
back (a base epoch, then the row's, twice; the median), which a drift of the machine's speed
between the rows cannot bias.

Run:  pytest bench/test_bench_epoch.py --benchmark-json=bench/results/epoch_<device>.json
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import pytest
import torch

from cost_fast import TaskGradients, get_aggregator, gram_stats
from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.cost import COST
from cost_fast.models import CelebACNN, SegNetMTL, batch_task_losses, synthetic_nyuv2
from cost_fast.teleport import TeleportConfig, TeleportSchedule
from cost_fast.teleport.semantics import PublicSemantics
from cost_fast.yardstick import YardstickCOST

DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
STEPS = 20
WORKLOADS = {  # name: (K, width, batch)
    "celeba": (40, 64 if GPU else 8, 64 if GPU else 8),
    "nyuv2": (3, 32 if GPU else 8, 32 if GPU else 8),
}
SCHEDULES = {"public": TeleportConfig(lr=1e-3, rounds=2), "budget": TeleportConfig(lr=1e-3, rounds=2, max_steps=8)}
IMPLS = {  # row: (schedule, implementation)
    "base": (None, "fast"),
    "cost_fast": ("public", "fast"),
    "cost_fast_budget": ("budget", "fast"),
    "cost_reference": ("public", "yardstick"),
}
_TEMPLATES: dict[str, tuple] = {}  # workload: (pretrained model, data, pretrain steps), built once
_WORK: dict[tuple[str, str], tuple[int, int]] = {}  # (workload, schedule): (teleports, adapter steps)
_BASE_EPOCH: dict[str, float] = {}


def make_workload(name: str):
    """(model, batches) of the workload; batches are (x, targets) on the device."""
    K, width, batch = WORKLOADS[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "celeba":
        model = CelebACNN(num_tasks=K, width=width)
        x = torch.randn(STEPS * batch, 3, 64, 64, generator=gen)
        directions = torch.randn(3 * 64 * 64, K, generator=gen)
        y = (x.flatten(1) @ directions > 0).long()  # independent random directions: tasks compete
        data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, STEPS * batch, batch)]
    else:
        model = SegNetMTL(width=width)
        x, (seg, depth, normal) = synthetic_nyuv2(STEPS * batch, size=32, seed=1)
        data = [
            (x[i : i + batch], (seg[i : i + batch], depth[i : i + batch], normal[i : i + batch]))
            for i in range(0, STEPS * batch, batch)
        ]
    to = lambda t: tuple(u.to(DEVICE) for u in t) if isinstance(t, tuple) else t.to(DEVICE)  # noqa: E731
    return model.to(DEVICE), [(to(x), to(y)) for x, y in data]


def pretrain_until_conflict(model, data, max_steps: int = 600) -> int:
    """Train with FairGrad until COST's public trigger (min_i cos(g_i, g0) ≤ 0) first holds;
    returns the number of steps."""
    engine = TaskGradients(model.backbone.parameters(), num_tasks=len(batch_task_losses(model, data[0])))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fairgrad = get_aggregator("fairgrad")
    heads = list(model.heads.parameters())
    for step in range(max_steps):
        losses = batch_task_losses(model, data[step % len(data)])
        stats = gram_stats(engine.compute(losses, retain_graph=True))
        if bool(stats.cos_mean.min() <= 0):
            return step
        opt.zero_grad(set_to_none=True)
        w = fairgrad(stats.gram)
        (losses @ w).backward(inputs=heads)
        engine.combine(w)
        opt.step()
    return max_steps


def template(workload: str):
    """The pretrained model, the epoch's batches (starting with the conflicting one) and the
    pretraining steps, built once per workload so that every row starts from the same state."""
    if workload not in _TEMPLATES:
        model, data = make_workload(workload)
        pretrained = pretrain_until_conflict(model, data)
        start = pretrained % len(data)
        _TEMPLATES[workload] = (model, data[start:] + data[:start], pretrained)
    return _TEMPLATES[workload]


def cost_epoch(model, data, schedule: str | None) -> tuple[int, int]:
    """One epoch of FairGrad + COST (no teleport for ``schedule=None``); (teleports, adapter steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=data,  # the epoch's loader, as the public code
        schedule=TeleportSchedule(max_per_epoch=0 if schedule is None else 1, steps_per_epoch=STEPS),
        teleport=SCHEDULES[schedule or "public"],
    )
    infos = [cost.step(batch_task_losses(model, b), b) for b in data]
    return sum(i.attempted_teleport for i in infos), sum(i.teleport_steps for i in infos)


def yardstick_epoch(model, data, schedule: str) -> tuple[int, int]:
    """The same epoch by ``YardstickCOST``: K backward passes and a copy loop per step, plain
    torch statistics, the straightforward teleport."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = YardstickCOST(
        model,
        "backbone",
        get_aggregator("fairgrad"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=data,
        semantics=PublicSemantics(),
        teleport=SCHEDULES[schedule],
    )
    teleports = sum(cost.step(batch_task_losses(model, b), b)["teleported"] for b in data)
    return teleports, cost.teleport_steps


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_epoch_time(benchmark, workload: str, impl: str) -> None:
    pretrained_model, data, pretrained = template(workload)
    K, width, batch = WORKLOADS[workload]
    schedule, kind = IMPLS[impl]
    work = []

    def setup():
        return (copy.deepcopy(pretrained_model),), {}

    def run(model) -> None:
        if kind == "yardstick":
            work.append(yardstick_epoch(model, data, schedule))
        else:
            work.append(cost_epoch(model, data, schedule))
        synchronize(DEVICE)

    benchmark.group = f"epoch {workload} K={K} width={width} batch={batch} steps={STEPS}"
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
    if len(set(work)) != 1:
        pytest.fail(f"{impl} did different work in its rounds: {work}")
    teleports, adapter_steps = work[0]
    median = benchmark.stats.stats.median
    if schedule is None:
        _BASE_EPOCH[workload] = median
    else:
        if teleports == 0:
            pytest.fail(f"{impl} on {workload} made no teleport: it would measure nothing")
        expected = _WORK.setdefault((workload, schedule), (teleports, adapter_steps))
        if (teleports, adapter_steps) != expected:
            pytest.fail(
                f"{impl} on {workload} did {teleports} teleports / {adapter_steps} adapter steps, other rows {expected}"
            )
    base = _BASE_EPOCH.get(workload)
    per_teleport = None if schedule is None or base is None else (median - base) / teleports / base
    paired = None
    if schedule is not None:
        shares = []
        for _ in range(2):
            seconds = []
            for kind_now, schedule_now in (("fast", None), (kind, schedule)):
                model = copy.deepcopy(pretrained_model)
                start = time.perf_counter()
                done = (yardstick_epoch if kind_now == "yardstick" else cost_epoch)(model, data, schedule_now)
                synchronize(DEVICE)
                seconds.append(time.perf_counter() - start)
                if schedule_now is not None and done != (teleports, adapter_steps):
                    pytest.fail(f"{impl}: a paired epoch did {done}, not {(teleports, adapter_steps)}")
            shares.append((seconds[1] - seconds[0]) / teleports / seconds[0])
        paired = statistics.median(shares)
    benchmark.extra_info.update(
        impl=impl,
        workload=workload,
        schedule=schedule or "none",
        teleports=teleports,
        adapter_steps=adapter_steps,
        teleport_in_base_epochs=per_teleport,
        teleport_in_base_epochs_paired=paired,
        K=K,
        width=width,
        batch=batch,
        steps=STEPS,
        pretrain_steps=pretrained,
        config=dataclasses.asdict(SCHEDULES[schedule]) if schedule else None,
    )
