"""Per-phase timings: every phase of a step is reported, and on CUDA they are device time (events),
not launch time."""

from __future__ import annotations

import time

import pytest
import torch
from tug import Tug, tug_batches

from cost_fast import COST, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.models import batch_task_losses
from cost_fast.timing import PhaseTimer


def test_cpu_phases_add_up_wall_time() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("sleep"):
            time.sleep(0.01)
    assert 0.02 <= timer.seconds()["sleep"] < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_phases_measure_the_device_not_the_launch() -> None:
    timer = PhaseTimer(torch.device("cuda"))
    start = time.perf_counter()
    with timer.phase("spin"):
        torch.cuda._sleep(200_000_000)  # a kernel that spins ~0.1 s; its launch returns at once
    launch = time.perf_counter() - start
    assert timer.seconds()["spin"] > 10 * launch


def test_a_step_reports_every_phase() -> None:
    torch.manual_seed(0)
    model, batches = Tug(), tug_batches(0, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        schedule=TeleportSchedule(steps_per_epoch=100),
        teleport=TeleportConfig(rounds=1),
    )
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    base = next(i for i in infos if not i.attempted_teleport)
    assert set(base.seconds) == {"gradients", "gram", "solve", "optimizer_step"}
    tele = next(i for i in infos if i.attempted_teleport)
    assert set(tele.seconds) == {"gradients", "gram", "teleport"}
    assert all(v > 0 for i in (base, tele) for v in i.seconds.values())
