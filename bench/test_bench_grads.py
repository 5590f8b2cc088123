"""Per-task gradients on a CelebA-shaped workload: engine loop vs engine batched vs the reference way.

Workload: the 9-layer CNN of the FairGrad/COST CelebA setup (``CelebACNN``), 40 binary heads,
64x64 inputs; batch 256 on a GPU. On CPU the batch is 8 (and the CNN full width) so that a run
takes minutes. Each timed call is one forward plus the K per-task gradients of the backbone.

The reference way (public COST/FairGrad code): K ``backward(retain_graph=True)`` calls over the
whole model, each followed by a Python loop that copies every parameter's ``.grad`` into
column i of a P x K buffer, recomputing the offset ``sum(grad_dims[:cnt])`` per parameter.

Run:  pytest bench/test_bench_grads.py --benchmark-json=bench/results/grads_<device>.json
"""

from __future__ import annotations

import pytest
import torch

from cost_fast import TaskGradients
from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.models import CelebACNN
from cost_fast.yardstick import yardstick_task_gradients

DEVICE = bench_device()
K = 40
BATCH = 256 if DEVICE.type == "cuda" else 8
WIDTH = 64


@pytest.mark.parametrize("impl", ["reference_loop", "engine_loop", "engine_batched"])
def test_per_task_gradients_speed(benchmark, impl: str) -> None:
    torch.manual_seed(0)
    model = CelebACNN(num_tasks=K, width=WIDTH).to(DEVICE)
    x = torch.randn(BATCH, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 2, (BATCH, K), device=DEVICE)
    shared = list(model.backbone.parameters())
    grad_dims = [p.numel() for p in shared]
    if impl == "reference_loop":
        buffer = torch.empty(sum(grad_dims), K, device=DEVICE)

        def step() -> None:
            yardstick_task_gradients(model, shared, model.task_losses(x, y), buffer)
    else:
        engine = TaskGradients(shared, num_tasks=K, mode=impl.removeprefix("engine_"))

        def step() -> None:
            engine.compute(model.task_losses(x, y))

    def timed() -> None:
        step()
        synchronize(DEVICE)

    timed()
    benchmark.group = f"per-task gradients K={K} batch={BATCH} width={WIDTH}"
    benchmark.extra_info.update(K=K, batch=BATCH, width=WIDTH, impl=impl, shared_params=sum(grad_dims))
    benchmark.pedantic(timed, rounds=3 if DEVICE.type == "cpu" else 20, warmup_rounds=1)
