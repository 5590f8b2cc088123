"""One epoch of each of the paper's experiments at its real input shapes, through the training
loop of ``cost-fast train`` (``cost_fast.apps.train_run.TrainingRun``): the base method alone
(FairGrad with the public code's step) against the same with COST (one teleport, the public
schedule: ``tele_round`` = 2 passes over the epoch's loader, n = 5).

Data: ``--synthetic`` samples of the real shapes (CityScapes 3x128x256, NYUv2 3x288x384, CelebA
3x64x64), ``STEPS`` batches per epoch. GPU: the papers' width 64 and batch sizes (8, 2, 256), 20
steps; CPU: width 4 (CelebA 8), batch 2 (CelebA 16), 4 steps, so that the suite runs in minutes.
Every round starts from the same freshly built run; a row fails unless every round took the
same steps, teleports and adapter steps, the base row no teleport and the COST row one.
``extra_info["cost_overhead"]`` is the COST epoch over the base epoch, less 1 (medians of the
same run).

Run:  pytest bench/test_bench_train.py --benchmark-json=bench/results/train_<device>.json
"""

from __future__ import annotations

import pytest

from cost_fast.apps import train_options
from cost_fast.apps.train import check_config
from cost_fast.apps.train_run import Progress, TrainingRun
from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.experiments.paper import EXPERIMENTS

DEVICE = bench_device()
GPU = DEVICE.type == "cuda"
STEPS = 20 if GPU else 4
SIZES = {  # experiment: (width, batch)
    "cityscapes": (64, 8) if GPU else (4, 2),
    "nyuv2": (64, 2) if GPU else (4, 2),
    "celeba": (64, 256) if GPU else (8, 16),
}
_WORK: dict[str, tuple[int, int, int]] = {}  # experiment: (steps, teleports, adapter steps) of the COST row
_BASE: dict[str, float] = {}


def configuration(experiment: str, with_cost: bool) -> dict:
    """The run's configuration: the recipe with synthetic data at the benchmark's size, COST
    (when on) teleporting at the first step."""
    width, batch = SIZES[experiment]
    given = {
        "synthetic": True,
        "samples": STEPS * batch,
        "width": width,
        "batch_size": batch,
        "epochs": 1,
        "workers": 4 if GPU else 0,
        "device": str(DEVICE),
        "progress": False,
        "cost": with_cost,
        "cost_start_epoch": 0,
        "trigger": "always",  # one teleport per epoch whatever the data: the same work every round
        "out": "unused",
    }
    config = train_options.resolve(given, EXPERIMENTS[experiment].recipe)
    check_config(config, EXPERIMENTS[experiment])
    return config


@pytest.mark.parametrize("impl", ["base", "cost"])
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_train_epoch(benchmark, experiment: str, impl: str) -> None:
    config = configuration(experiment, impl == "cost")
    splits = EXPERIMENTS[experiment].splits(config)
    work = []

    def setup():
        return (TrainingRun(config, EXPERIMENTS[experiment], splits, DEVICE),), {}

    def run(training: TrainingRun) -> None:
        row = training.train_epoch(0, Progress(None, enabled=False))
        synchronize(DEVICE)
        work.append((row["steps"], row["teleports"], row["adapter_steps"]))

    width, batch = SIZES[experiment]
    benchmark.group = f"train epoch {experiment} width={width} batch={batch} steps={STEPS}"
    benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1)
    if len(set(work)) != 1:
        pytest.fail(f"{impl} did different work in its rounds: {work}")
    steps, teleports, adapter_steps = work[0]
    if steps != STEPS or teleports != (impl == "cost"):
        pytest.fail(
            f"{impl} on {experiment}: {steps} steps and {teleports} teleports, expected {STEPS} and {int(impl == 'cost')}"
        )
    median = benchmark.stats.stats.median
    if impl == "base":
        _BASE[experiment] = median
    else:
        _WORK[experiment] = work[0]
    base = _BASE.get(experiment)
    benchmark.extra_info.update(
        impl=impl,
        experiment=experiment,
        width=width,
        batch=batch,
        steps=steps,
        teleports=teleports,
        adapter_steps=adapter_steps,
        cost_overhead=None if impl == "base" or base is None else median / base - 1,
    )
