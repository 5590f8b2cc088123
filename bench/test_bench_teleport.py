"""One COST teleport (public semantics), fast engine vs the straightforward yardstick.

Workload: ``CelebACNN`` (40 binary tasks, 64x64 inputs); on CPU width 8, batch 8, 4 teleport
batches, ``rounds`` = 2 (8 adapter steps of 1 + 1 + 5 forward passes each), n = 5, LoRA rank 5.
On a GPU: width 64, batch 64. Both sides get the same model, data and noise generator seed.
``fast`` evaluates the n perturbed samples one forward pass each (in place), ``fast_batched`` all
n in one vmapped pass (``samples_per_pass = n``).

Run:  pytest bench/test_bench_teleport.py --benchmark-json=bench/results/teleport_<device>.json
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.models import CelebACNN, batch_task_losses
from cost_fast.teleport import TeleportConfig, teleport
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.semantics import PublicSemantics
from cost_fast.yardstick import yardstick_teleport

DEVICE = bench_device()
K = 40
WIDTH, BATCH = (64, 64) if DEVICE.type == "cuda" else (8, 8)
RANK = 5
# no pass after the merge: the yardstick, as the public code, measures no level-set error
CONFIG = TeleportConfig(lr=1e-3, rounds=2, guard_tolerance=1e9, measure_level_set=False)


@pytest.mark.parametrize("impl", ["reference", "fast", "fast_batched"])
def test_teleport_speed(benchmark, impl: str) -> None:
    torch.manual_seed(0)
    model = CelebACNN(num_tasks=K, width=WIDTH).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(BATCH, 3, 64, 64, generator=gen).to(DEVICE),
            torch.randint(0, 2, (BATCH, K), generator=gen).to(DEVICE),
        )
        for _ in range(4)
    ]
    current = data[0]
    semantics = PublicSemantics()
    norms = torch.rand(K, generator=gen).to(DEVICE)
    ratios = semantics.ratio_weights(norms)
    if impl.startswith("fast"):
        adapter = TeleportAdapter(model.backbone, rank=RANK)
        config = dataclasses.replace(CONFIG, samples_per_pass=CONFIG.num_samples if impl == "fast_batched" else 1)

        def run() -> None:
            teleport(
                model,
                adapter,
                batch_task_losses,
                data,
                current,
                ratios=ratios,
                semantics=semantics,
                config=config,
                generator=torch.Generator(DEVICE).manual_seed(2),
            )
            synchronize(DEVICE)
    else:
        original = copy.deepcopy(model)

        def run() -> None:
            yardstick_teleport(
                original,
                "backbone",
                batch_task_losses,
                data,
                current,
                norms=norms,
                semantics=semantics,
                config=CONFIG,
                lr=CONFIG.lr,
                rank=RANK,
                generator=torch.Generator(DEVICE).manual_seed(2),
            )
            synchronize(DEVICE)

    benchmark.group = f"teleport K={K} width={WIDTH} batch={BATCH} steps=8 n=5"
    # the yardstick builds its LoRA with semantics.lora_alpha; teleport() sets the fast adapter's from it
    benchmark.extra_info.update(impl=impl, K=K, width=WIDTH, batch=BATCH, lora_scale=semantics.lora_alpha / RANK)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    if impl.startswith("fast"):  # the rows do the same work: the adapter ran at the semantics' scale
        assert adapter.alpha == semantics.lora_alpha
