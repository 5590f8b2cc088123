"""The teleport's forward passes against the plain model's: the adapter in weight space.

Workloads: ``CelebACNN`` (40 binary tasks, 64x64 inputs) and ``SegNetMTL`` (3 dense tasks, 32x32)
at widths 8 and 32, batch 8 (GPU: batch 32). One thread on CPU (``torch.set_num_threads(1)``), so
that the rows of one run are comparable on a shared machine.

Group ``forward``: the task losses without grad, with the adapter's weights in effect.

- ``floor``: a plain forward pass of the model (what the adapter's forward should cost).
- ``weight_space``: the model at W + ΔW through ``torch.func.functional_call`` (``EffectivePoint``),
  ΔW formed once beforehand, as the teleport does once per adapter step.
- ``peft``: the model with peft's LoRA layers attached (each adapted layer: its base op plus the
  adapter's two ops, a scale and an add), as the teleport ran before.

Each row checks that it computed the same losses as the others (the same factors, scale 8/5).

Group ``steps``: a teleport of 8 adapter steps (public semantics, n = 5, guard off, one teleport
batch, so: one contour pass + 8 steps + the merge) against its floor, the same passes on the
plain model: one no-grad forward, then per step n no-grad forwards on the current batch, two
forwards with grad (current and teleport batch) and their backward to the adapted weights.

- ``floor``; ``weight_space`` (``teleport``, one perturbed sample per pass);
  ``weight_space_batched`` (``samples_per_pass = n``: the n perturbed samples in one vmapped pass).

Each teleport row checks that it took 8 adapter steps and merged (not rolled back).

The machine's speed drifts over seconds (shared cores), so besides its median every row but the
floor records ``ratio_to_floor``: the median of its time over the floor's in pairs measured
back to back (floor, then the row), which a drift between the rows cannot bias.

Run:  pytest bench/test_bench_adapter.py --benchmark-json=bench/results/adapter_<device>.json
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.models import CelebACNN, SegNetMTL, batch_task_losses, synthetic_nyuv2
from cost_fast.teleport import TeleportConfig, teleport
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.perturbed import EffectivePoint
from cost_fast.teleport.semantics import PublicSemantics

DEVICE = bench_device()
if DEVICE.type == "cpu":
    torch.set_num_threads(1)
BATCH = 32 if DEVICE.type == "cuda" else 8
RANK, STEPS, SAMPLES = 5, 8, 5
SEMANTICS = PublicSemantics()
WORKLOADS = [("celeba", 8), ("celeba", 32), ("nyuv2", 8), ("nyuv2", 32)]


def workload(name: str, width: int):
    """(model in eval mode, two batches, the adapter with drawn factors and B away from 0)."""
    torch.manual_seed(0)
    if name == "celeba":
        model = CelebACNN(num_tasks=40, width=width)
        gen = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(BATCH, 3, 64, 64, generator=gen), torch.randint(0, 2, (BATCH, 40), generator=gen))
            for _ in range(2)
        ]
    else:
        model = SegNetMTL(width=width)
        x, targets = synthetic_nyuv2(2 * BATCH, size=32, seed=1)
        batches = [(x[i : i + BATCH], tuple(t[i : i + BATCH] for t in targets)) for i in (0, BATCH)]
    to = lambda t: tuple(u.to(DEVICE) for u in t) if isinstance(t, tuple) else t.to(DEVICE)  # noqa: E731
    model = model.to(DEVICE).eval()
    batches = [(to(x), to(y)) for x, y in batches]
    adapter = TeleportAdapter(model.backbone, rank=RANK, generator=torch.Generator(DEVICE).manual_seed(2))
    adapter.set_alpha(SEMANTICS.lora_alpha)
    adapter.reset()
    with torch.no_grad():  # B away from 0, so that the rows' losses differ from the plain model's
        for b in adapter.adapter_parameters[1::2]:
            b.normal_(std=0.01, generator=torch.Generator(DEVICE).manual_seed(3))
    return model, batches, adapter


def ratio_to_floor(run: Callable[[], object], floor: Callable[[], object], pairs: int) -> float:
    """Median over ``pairs`` back-to-back pairs of (time of ``run``) / (time of ``floor``)."""
    ratios = []
    for _ in range(pairs):
        times = []
        for fn in (floor, run):
            start = time.perf_counter()
            fn()
            synchronize(DEVICE)
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    return statistics.median(ratios)


def peft_copy(model, adapter):
    """A copy of the model with peft's LoRA layers holding the adapter's factors."""
    from peft import LoraConfig, inject_adapter_in_model

    copied = copy.deepcopy(model)
    pattern = "^(" + "|".join(f"backbone.{name}" if name else "backbone" for name in adapter.names) + ")$"
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=SEMANTICS.lora_alpha, target_modules=pattern), copied)
    layers = [copied.get_submodule(f"backbone.{name}") for name in adapter.names]
    with torch.no_grad():
        for layer, a, b in zip(layers, adapter.adapter_parameters[0::2], adapter.adapter_parameters[1::2]):
            layer.lora_A["default"].weight.copy_(a.view_as(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.copy_(b.view_as(layer.lora_B["default"].weight))
    return copied.eval()


@pytest.mark.parametrize("impl", ["floor", "weight_space", "peft"])
@pytest.mark.parametrize(("name", "width"), WORKLOADS)
def test_forward_with_the_adapter(benchmark, name: str, width: int, impl: str) -> None:
    model, batches, adapter = workload(name, width)
    batch = batches[0]
    name_of = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        deltas = adapter.deltas()
        point = EffectivePoint(
            model,
            batch_task_losses,
            {name_of[id(w)]: w + d for w, d in zip(adapter.adapted_weights, deltas)},
            lambda: adapter.applied(deltas),
        )
        with point.applied():
            expected = batch_task_losses(model, batch)
    run_model = peft_copy(model, adapter) if impl == "peft" else model

    def forward(impl: str) -> torch.Tensor:
        with torch.no_grad():
            out = point.losses(batch) if impl == "weight_space" else batch_task_losses(run_model, batch)
        synchronize(DEVICE)
        return out

    def run() -> torch.Tensor:
        return forward(impl)

    benchmark.group = f"forward {name} width={width} batch={BATCH}"
    benchmark.extra_info.update(impl=impl, workload=name, width=width, batch=BATCH, lora_scale=adapter.scale)
    out = benchmark.pedantic(run, rounds=15, warmup_rounds=2)
    if impl == "floor":
        assert not torch.allclose(out, expected)  # the adapter changes the losses: the others do work
    else:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        plain = lambda: batch_task_losses(model, batch)  # noqa: E731
        with torch.no_grad():
            benchmark.extra_info["ratio_to_floor"] = ratio_to_floor(run, plain, pairs=15)


@pytest.mark.parametrize("impl", ["floor", "weight_space", "weight_space_batched"])
@pytest.mark.parametrize(("name", "width"), WORKLOADS)
def test_adapter_steps(benchmark, name: str, width: int, impl: str) -> None:
    model, batches, adapter = workload(name, width)
    current, data = batches[0], [batches[1]]
    weights = adapter.adapted_weights
    steps_taken = []

    def floor() -> None:
        with torch.no_grad():
            batch_task_losses(model, data[0])  # the contour pass
        for _ in range(STEPS):
            with torch.no_grad():
                for _ in range(SAMPLES):
                    batch_task_losses(model, current)
            total = batch_task_losses(model, current).sum() + batch_task_losses(model, data[0]).sum()
            torch.autograd.grad(total, weights)
        steps_taken.append(STEPS)

    # no pass after the merge: the floor has none (the public code measures no level-set error)
    config = TeleportConfig(
        lr=1e-3,
        rounds=STEPS,
        guard=False,
        measure_level_set=False,
        samples_per_pass=SAMPLES if impl == "weight_space_batched" else 1,
    )
    snapshot = adapter.snapshot()
    ratios = SEMANTICS.ratio_weights(torch.linspace(0.5, 2.0, 40 if name == "celeba" else 3, device=DEVICE))

    def fast() -> None:
        result = teleport(
            model,
            adapter,
            batch_task_losses,
            data,
            current,
            ratios=ratios,
            semantics=SEMANTICS,
            config=config,
            generator=torch.Generator(DEVICE).manual_seed(4),
        )
        adapter.restore(snapshot)  # every round from the same weights
        assert not result.rolled_back
        steps_taken.append(result.steps)

    def run() -> None:
        (floor if impl == "floor" else fast)()
        synchronize(DEVICE)

    benchmark.group = f"steps {name} width={width} batch={BATCH} steps={STEPS} n={SAMPLES}"
    benchmark.extra_info.update(impl=impl, workload=name, width=width, batch=BATCH, adapter_steps=STEPS)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    if impl != "floor":
        benchmark.extra_info["ratio_to_floor"] = ratio_to_floor(fast, floor, pairs=3)
    assert set(steps_taken) == {STEPS}, f"{impl} took {steps_taken} adapter steps, not {STEPS}"
