"""Epoch time: base FairGrad, FairGrad + COST (fast engine), FairGrad + COST (reference teleport).

Same settings on all three: CelebA-shaped CNN (``CelebACNN``, 40 binary tasks, 64x64 inputs),
per-task gradients by ``TaskGradients``, FairGrad (α = 1) weights, Adam; COST with the
reference semantics, at most 1 teleport per epoch, 2 rounds over 4 teleport batches, n = 5,
LoRA rank 5. CPU: width 8, batch 8, 20 steps per epoch (GPU: width 64, batch 64). The
reference epoch differs only in its teleport: ``cost_fast.reference.reference_teleport``
(deep copies, ``get_peft_model``, ``merge_and_unload``), whose weights are copied back.
``extra_info["teleports"]`` records how many teleports the timed epoch made.

Run:  pytest bench/test_bench_epoch.py --benchmark-json=bench/results/epoch_<device>.json
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.stamp import bench_device, synchronize
from cost_fast import TaskGradients, get_aggregator, gram_stats
from cost_fast.cost import COST
from cost_fast.htr import apply_htr, flat_cosine
from cost_fast.models import CelebACNN
from cost_fast.reference import reference_teleport
from cost_fast.teleport import TeleportConfig, reference_ratio_weights

DEVICE = bench_device()
K = 40
WIDTH, BATCH = (64, 64) if DEVICE.type == "cuda" else (8, 8)
STEPS = 20
CONFIG = TeleportConfig(lr=1e-3, rounds=2)


def loss_fn(model, batch):
    x, y = batch
    return model.task_losses(x, y)


def make_data():
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 3, 64, 64, generator=gen).to(DEVICE),
            torch.randint(0, 2, (BATCH, K), generator=gen).to(DEVICE),
        )
        for _ in range(STEPS)
    ]


def cost_epoch(model, data, max_teleports: int) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        opt,
        loss_fn,
        data[:4],
        max_teleports_per_epoch=max_teleports,
        teleport=CONFIG,
    )
    return sum(cost.step(loss_fn(model, b), b).teleported for b in data)


def reference_epoch(model, data) -> int:
    """The same loop, teleporting with the reference implementation."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine = TaskGradients(model.backbone.parameters(), num_tasks=K)
    fairgrad = get_aggregator("fairgrad")
    heads = list(model.heads.parameters())
    teleports, updated = 0, False
    for batch in data:
        losses = loss_fn(model, batch)
        stats = gram_stats(engine.compute(losses, retain_graph=True))
        if bool(stats.cos_mean.min() <= 0) and teleports == 0:
            before = [p.detach().clone() for p in engine.params]
            moved = reference_teleport(
                model, "backbone", loss_fn, data[:4], batch, reference_ratio_weights(stats.norms), CONFIG
            )
            with torch.no_grad():
                for p, q in zip(model.backbone.parameters(), moved.backbone.parameters()):
                    p.copy_(q)
            teleports += 1
            opt.zero_grad(set_to_none=True)
            if updated:
                sigma = float(
                    flat_cosine([p.detach() - b for p, b in zip(engine.params, before)], engine.combined_views)
                )
                apply_htr(opt, max(-1.0, min(1.0, sigma)))
            continue
        opt.zero_grad(set_to_none=True)
        w = fairgrad(stats.gram)
        (losses @ w).backward(inputs=heads)
        engine.combine(w)
        opt.step()
        updated = True
    return teleports


@pytest.mark.parametrize("impl", ["base", "cost_fast", "cost_reference"])
def test_epoch_time(benchmark, impl: str) -> None:
    torch.manual_seed(0)
    template = CelebACNN(num_tasks=K, width=WIDTH).to(DEVICE)
    data = make_data()
    teleports = []

    def setup():
        return (copy.deepcopy(template),), {}

    def run(model) -> None:
        if impl == "cost_reference":
            teleports.append(reference_epoch(model, data))
        else:
            teleports.append(cost_epoch(model, data, 0 if impl == "base" else 1))
        synchronize(DEVICE)

    benchmark.group = f"epoch K={K} width={WIDTH} batch={BATCH} steps={STEPS}"
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update(impl=impl, teleports=teleports[-1], K=K, width=WIDTH, batch=BATCH, steps=STEPS)
