"""What each phase of COST launches and reads, counted (``cost_fast.bench.launches.LaunchCount``):
dispatched aten ops without views and allocations (about one kernel each on CUDA), ops on host
copies (a method's solve), and device reads (``.item()``-like reads and host transfers, a
synchronisation each on CUDA). The counts do not depend on the machine's speed; each row is also
timed, and that time does.

Workloads: ``CelebACNN`` (K = 40 binary tasks, 40 separate heads, 64x64 inputs) and
``SegNetMTL`` (K = 3 dense tasks, 32x32), width 8, batch 8, float32, FairGrad as the base method,
COST's defaults, ``Adam(foreach=True)`` as the training optimizer.

Rows (``impl``), per workload:

- ``forward``: the task losses with grad (the floor of one pass).
- ``task_gradients_loop``, ``task_gradients_split``, ``task_gradients_representation``: G from
  the losses by K plain backward passes, by the split at the backbone's output (COST's default),
  and ∂L/∂z for ``gradient_mode="representation"`` (each row checks its G against the loop's).
- ``gram``: M and the conflict statistics from G.
- ``solve``: FairGrad's weights from M, on the host copy (``host_ops``) after one transfer.
- ``base_step``: one ``COST.step`` without a teleport, less the optimizer's own step (given apart
  as ``optimizer_ops``).
- ``adapter_step_floor``: the plain model's passes of one adapter step (n no-grad forwards, the
  two forwards with grad and their backward to the adapted weights).
- ``adapter_step`` (this device's defaults), ``adapter_step_batched`` (the n samples in one
  vmapped pass), ``adapter_step_stacked`` (that, and the two forwards with grad as one),
  ``adapter_step_per_tensor`` (the public code's per-tensor noise stream, one sample per pass):
  one adapter step, the difference of teleports of 4 and 2 steps, halved (each row checks the
  steps taken).
- ``adapter_steps_captured`` (CUDA only): a teleport of 8 adapter steps with
  ``TeleportConfig(cuda_graphs=True)``, timed against the same teleport eagerly (``eager_s``),
  its terms checked against the eager ones.
- ``contour``: L* over one teleport batch. ``merge``: the adapter merged into the backbone.

Run:  pytest bench/test_bench_launches.py --benchmark-json=bench/results/launches_<device>.json
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cost_fast import COST, BaseStepConfig, TeleportSchedule, get_aggregator
from cost_fast.bench.launches import LaunchCount
from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.grads import RepresentationGradients, TaskGradients
from cost_fast.kernels import gram_stats
from cost_fast.models import CelebACNN, SegNetMTL, batch_task_losses, synthetic_nyuv2
from cost_fast.split_grads import OutputCapture, SplitTaskGradients
from cost_fast.teleport import TeleportConfig, loss_contour, teleport
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.semantics import PublicSemantics

DEVICE = bench_device()
if DEVICE.type == "cpu":
    torch.set_num_threads(1)
WIDTH, BATCH, SAMPLES = 8, 8, 5
WORKLOADS = ["celeba", "nyuv2"]
ADAPTER_ROWS = {  # row: (TeleportConfig changes, semantics)
    "adapter_step": ({}, PublicSemantics()),
    "adapter_step_batched": ({"samples_per_pass": SAMPLES, "stack_batches": False}, PublicSemantics()),
    "adapter_step_stacked": ({"samples_per_pass": SAMPLES, "stack_batches": True}, PublicSemantics()),
    "adapter_step_per_tensor": ({"samples_per_pass": 1}, PublicSemantics(noise="per_tensor")),
}


def workload(name: str):
    """(model in eval mode, K, two batches on the device)."""
    torch.manual_seed(0)
    if name == "celeba":
        model, K = CelebACNN(num_tasks=40, width=WIDTH), 40
        gen = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(BATCH, 3, 64, 64, generator=gen), torch.randint(0, 2, (BATCH, 40), generator=gen).float())
            for _ in range(2)
        ]
    else:
        model, K = SegNetMTL(width=WIDTH), 3
        x, targets = synthetic_nyuv2(2 * BATCH, size=32, seed=1)
        batches = [(x[i : i + BATCH], tuple(t[i : i + BATCH] for t in targets)) for i in (0, BATCH)]
    to = lambda t: tuple(u.to(DEVICE) for u in t) if isinstance(t, tuple) else t.to(DEVICE)  # noqa: E731
    return model.to(DEVICE).eval(), K, [(to(x), to(y)) for x, y in batches]


def record(benchmark, name: str, impl: str, count: LaunchCount, run, **extra) -> None:
    """Time ``run`` and store the counts with it."""
    benchmark.group = f"launches {name} K={40 if name == 'celeba' else 3} width={WIDTH} batch={BATCH}"
    benchmark.extra_info.update(
        impl=impl, workload=name, ops=count.ops, host_ops=count.host_ops, reads=count.reads, **extra
    )
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def timed(fn):
    def run():
        fn()
        synchronize(DEVICE)

    return run


@pytest.mark.parametrize("name", WORKLOADS)
def test_forward(benchmark, name: str) -> None:
    model, _, (batch, _) = workload(name)
    with LaunchCount() as count:
        batch_task_losses(model, batch)
    record(benchmark, name, "forward", count, timed(lambda: batch_task_losses(model, batch)))


@pytest.mark.parametrize("mode", ["loop", "split", "representation"])
@pytest.mark.parametrize("name", WORKLOADS)
def test_task_gradients(benchmark, name: str, mode: str) -> None:
    model, K, (batch, _) = workload(name)
    params = [p for p in model.backbone.parameters()]
    reference = TaskGradients(params, K).compute(batch_task_losses(model, batch)).clone()
    if mode == "loop":
        engine = TaskGradients(params, K)
    elif mode == "split":
        capture = OutputCapture(model.backbone)
        engine = SplitTaskGradients(params, K, capture)
        engine.compute(batch_task_losses(model, batch))  # the first step checks the split against the loop
    else:
        engine = RepresentationGradients(model.backbone, params, K)

    def compute():
        losses = batch_task_losses(model, batch)
        with LaunchCount() as count:
            grads = engine.compute(losses)
        return count, grads

    count, grads = compute()
    if mode == "representation":  # ∂L_i/∂z: other numbers, the same shape of work (K rows)
        assert grads.shape[0] == K and torch.isfinite(grads).all()
    else:
        torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-6)
        assert mode == "loop" or engine.split_off is None
    record(benchmark, name, f"task_gradients_{mode}", count, timed(compute))


@pytest.mark.parametrize("name", WORKLOADS)
def test_gram(benchmark, name: str) -> None:
    model, K, (batch, _) = workload(name)
    grads = TaskGradients(list(model.backbone.parameters()), K).compute(batch_task_losses(model, batch))
    with LaunchCount() as count:
        gram_stats(grads)
    record(benchmark, name, "gram", count, timed(lambda: gram_stats(grads)))


@pytest.mark.parametrize("name", WORKLOADS)
def test_solve(benchmark, name: str) -> None:
    from cost_fast import host

    model, K, (batch, _) = workload(name)
    grads = TaskGradients(list(model.backbone.parameters()), K).compute(batch_task_losses(model, batch))
    gram = gram_stats(grads).gram
    method = get_aggregator("fairgrad")

    def solve():
        on_host = host.to_host(gram)
        with host.section():
            return method.weights(on_host)

    with LaunchCount() as count:
        w = solve()
    assert w.shape == (K,) and torch.isfinite(w).all()
    record(benchmark, name, "solve", count, timed(solve))


@pytest.mark.parametrize("name", WORKLOADS)
def test_base_step(benchmark, name: str) -> None:
    model, _, batches = workload(name)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    cost = COST(
        model,
        model.backbone,
        "fairgrad",
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches,
        schedule=TeleportSchedule(max_per_epoch=0),  # no teleport: the base step alone
        base_step=BaseStepConfig(),
    )
    batch = batches[0]
    cost.step(batch_task_losses(model, batch), batch)  # the first step (the split's check, Adam's state)

    def step():
        info = cost.step(batch_task_losses(model, batch), batch)
        assert not info.skipped and not info.attempted_teleport

    losses = batch_task_losses(model, batch)
    with LaunchCount() as count:
        cost.step(losses, batch)
    with LaunchCount() as opt:
        optimizer.step()
    count.ops -= opt.ops
    count.scalar_reads -= opt.scalar_reads
    record(benchmark, name, "base_step", count, timed(step), optimizer_ops=opt.ops, optimizer_reads=opt.reads)
    cost.close()


def adapter_teleport(model, K, batches, steps: int, changes: dict, semantics):
    adapter = TeleportAdapter(model.backbone, rank=5, generator=torch.Generator(DEVICE).manual_seed(2))
    config = TeleportConfig(lr=1e-3, rounds=steps, max_steps=steps, measure_level_set=False, num_samples=SAMPLES)
    config = dataclasses.replace(config, **changes)
    ratios = semantics.ratio_weights(torch.linspace(0.5, 2.0, K, device=DEVICE))
    snapshot = adapter.snapshot()

    def run():
        result = teleport(
            model,
            adapter,
            batch_task_losses,
            [batches[1]],
            batches[0],
            ratios=ratios,
            semantics=semantics,
            config=config,
            generator=torch.Generator(DEVICE).manual_seed(3),
        )
        adapter.restore(snapshot)
        assert result.steps == steps and not result.rolled_back
        return result

    return run


@pytest.mark.parametrize("row", list(ADAPTER_ROWS))
@pytest.mark.parametrize("name", WORKLOADS)
def test_adapter_step(benchmark, name: str, row: str) -> None:
    model, K, batches = workload(name)
    changes, semantics = ADAPTER_ROWS[row]
    counts = {}
    for steps in (2, 4):
        run = adapter_teleport(model, K, batches, steps, changes, semantics)
        with LaunchCount() as counts[steps]:
            run()
    count = LaunchCount()
    count.ops = (counts[4].ops - counts[2].ops) // 2
    count.host_ops = (counts[4].host_ops - counts[2].host_ops) // 2
    count.scalar_reads = (counts[4].reads - counts[2].reads) // 2
    two_steps = adapter_teleport(model, K, batches, 2, changes, semantics)
    config = TeleportConfig(num_samples=SAMPLES, **changes)
    record(
        benchmark,
        name,
        row,
        count,
        timed(two_steps),
        timed_steps=2,
        samples_per_pass=config.resolved_samples_per_pass(DEVICE),
        stack_batches=config.stack_batches,
        noise=semantics.noise,
    )


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", WORKLOADS)
def test_adapter_steps_captured(benchmark, name: str) -> None:
    """A teleport of 8 adapter steps with ``cuda_graphs=True`` (two eager steps, one capture,
    replays) against the same teleport eagerly: the same terms, and both times."""
    import statistics
    import time

    model, K, batches = workload(name)
    eager = adapter_teleport(model, K, batches, 8, {}, PublicSemantics())
    graphed = adapter_teleport(model, K, batches, 8, {"cuda_graphs": True}, PublicSemantics())
    expected, result = eager(), graphed()
    assert result.graph_note == "captured", result.graph_note
    terms = torch.tensor(result.task_terms + result.sharpness_terms)
    torch.testing.assert_close(
        terms, torch.tensor(expected.task_terms + expected.sharpness_terms), rtol=1e-3, atol=1e-6
    )
    times = []
    for _ in range(5):
        start = time.perf_counter()
        eager()
        synchronize(DEVICE)
        times.append(time.perf_counter() - start)
    with LaunchCount() as count:  # ops are counted at the capture; a replay launches one graph
        graphed()
    record(benchmark, name, "adapter_steps_captured", count, timed(graphed), eager_s=statistics.median(times))


@pytest.mark.parametrize("name", WORKLOADS)
def test_adapter_step_floor(benchmark, name: str) -> None:
    model, _, (current, batch) = workload(name)
    weights = [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]

    def floor():
        with torch.no_grad():
            for _ in range(SAMPLES):
                batch_task_losses(model, current)
        total = batch_task_losses(model, current).sum() + batch_task_losses(model, batch).sum()
        torch.autograd.grad(total, weights)

    with LaunchCount() as count:
        floor()
    record(benchmark, name, "adapter_step_floor", count, timed(floor))


@pytest.mark.parametrize("name", WORKLOADS)
def test_contour(benchmark, name: str) -> None:
    model, _, (_, batch) = workload(name)
    with LaunchCount() as count:
        loss_contour(model, batch_task_losses, [batch])
    record(benchmark, name, "contour", count, timed(lambda: loss_contour(model, batch_task_losses, [batch])))


@pytest.mark.parametrize("name", WORKLOADS)
def test_merge(benchmark, name: str) -> None:
    model, _, _ = workload(name)
    adapter = TeleportAdapter(model.backbone, rank=5, generator=torch.Generator(DEVICE).manual_seed(2))
    adapter.set_alpha(PublicSemantics().lora_alpha)
    adapter.reset()
    snapshot = adapter.snapshot()

    def merge():
        adapter.merge()
        adapter.restore(snapshot)

    with LaunchCount() as count:
        adapter.merge()
    adapter.restore(snapshot)
    record(benchmark, name, "merge", count, timed(merge))
