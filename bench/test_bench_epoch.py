"""Epoch time: base FairGrad, FairGrad + COST (fast engine), FairGrad + COST (the yardstick).

Two workloads: CelebA-shaped (``CelebACNN``, 40 binary tasks, 64x64 inputs; CPU: width 8,
batch 8; GPU: width 64, batch 64) and NYUv2-shaped (``SegNetMTL``, segmentation + depth +
normals on synthetic 32x32 images; CPU: width 8, batch 8; GPU: width 32, batch 32).
Same settings for all: FairGrad (α = 1) weights, Adam; COST with the public code's semantics, at
most 1 teleport per epoch, 2 rounds over 4 teleport batches, n = 5, LoRA rank 5, 20 steps per
epoch. ``base`` and ``cost_fast`` run ``COST`` (``base`` with no teleport allowed);
``cost_fast_batched`` evaluates the n perturbed samples in one vmapped pass;
``cost_reference`` runs ``cost_fast.yardstick.YardstickCOST``, the public code's structure: K
backward passes and a copy loop per step, plain torch statistics, and the straightforward
teleport (deep copies, ``get_peft_model``, ``merge_and_unload``).
The NYUv2-shaped model is first trained with FairGrad until its tasks conflict
(``pretrain_until_conflict``; ``extra_info["pretrain_steps"]``), as its synthetic tasks agree at
initialization, and its timed epoch starts with the batch on which they conflicted. ``extra_info["teleports"]`` records how many teleports the timed epoch made.

Run:  pytest bench/test_bench_epoch.py --benchmark-json=bench/results/epoch_<device>.json
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cost_fast import TaskGradients, get_aggregator, gram_stats
from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.cost import COST
from cost_fast.models import CelebACNN, SegNetMTL, batch_task_losses, synthetic_nyuv2
from cost_fast.semantics import PublicSemantics
from cost_fast.teleport import TeleportConfig
from cost_fast.yardstick import YardstickCOST

DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
STEPS = 20
WORKLOADS = {  # name: (K, width, batch)
    "celeba": (40, 64 if GPU else 8, 64 if GPU else 8),
    "nyuv2": (3, 32 if GPU else 8, 32 if GPU else 8),
}
CONFIG = TeleportConfig(lr=1e-3, rounds=2)


def make_workload(name: str):
    """(model, batches) of the workload; batches are (x, targets) on the device."""
    K, width, batch = WORKLOADS[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "celeba":
        model = CelebACNN(num_tasks=K, width=width)
        data = [
            (torch.randn(batch, 3, 64, 64, generator=gen), torch.randint(0, 2, (batch, K), generator=gen))
            for _ in range(STEPS)
        ]
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
    """Train with FairGrad until COST's public-semantics trigger (min_i cos(g_i, g0) ≤ 0) first holds;
    returns the number of steps. The synthetic NYUv2 tasks agree at initialization (no
    teleport would happen in a timed epoch); conflicts appear a few hundred steps in."""
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


def cost_epoch(model, data, max_teleports: int, config: TeleportConfig = CONFIG) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=data[:4],
        max_teleports_per_epoch=max_teleports,
        steps_per_epoch=STEPS,
        teleport=config,
    )
    return sum(cost.step(batch_task_losses(model, b), b).teleported for b in data)


def reference_epoch(model, data) -> int:
    """The same epoch by ``YardstickCOST``: K backward passes and a copy loop per step, plain
    torch statistics, the straightforward teleport."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = YardstickCOST(
        model,
        "backbone",
        get_aggregator("fairgrad"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=data[:4],
        semantics=PublicSemantics(),
        teleport=CONFIG,
    )
    return sum(cost.step(batch_task_losses(model, b), b)["teleported"] for b in data)


@pytest.mark.parametrize("impl", ["base", "cost_fast", "cost_fast_batched", "cost_reference"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_epoch_time(benchmark, workload: str, impl: str) -> None:
    template, data = make_workload(workload)
    K, width, batch = WORKLOADS[workload]
    pretrained = pretrain_until_conflict(template, data) if workload == "nyuv2" else 0
    start = pretrained % len(data)
    data = data[start:] + data[:start]  # the timed epoch starts with the conflicting batch
    teleports = []

    def setup():
        return (copy.deepcopy(template),), {}

    def run(model) -> None:
        if impl == "cost_reference":
            teleports.append(reference_epoch(model, data))
        elif impl == "cost_fast_batched":
            batched = dataclasses.replace(CONFIG, samples_per_pass=CONFIG.num_samples)
            teleports.append(cost_epoch(model, data, 1, batched))
        else:
            teleports.append(cost_epoch(model, data, 0 if impl == "base" else 1))
        synchronize(DEVICE)

    benchmark.group = f"epoch {workload} K={K} width={width} batch={batch} steps={STEPS}"
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        impl=impl,
        workload=workload,
        teleports=teleports[-1],
        K=K,
        width=width,
        batch=batch,
        steps=STEPS,
        pretrain_steps=pretrained,
    )
