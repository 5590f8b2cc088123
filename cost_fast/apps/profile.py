"""``cost-fast profile``: where the time of a COST run goes, fast engine against the yardstick.

Four phases on a CelebA-shaped workload (``CelebACNN``, synthetic 64x64 images), each run once
to warm up and once under ``torch.profiler``:

- ``step_fast``: per-task gradients by ``TaskGradients`` + ``gram_stats`` + FairGrad + Adam step;
- ``step_yardstick``: the same step with ``yardstick_task_gradients`` (K backward calls and a
  copy loop) and the Gram matrix and statistics the plain way;
- ``teleport_fast``: one ``teleport`` (public semantics);
- ``teleport_yardstick``: the same teleport by ``yardstick_teleport``.

Writes, into the output folder, a Chrome trace per phase (``<phase>.trace.json``, open in
chrome://tracing or Perfetto) and ``summary.txt`` with each phase's wall time and top operations.
The folder is written under a temporary name and renamed at the end, so it is never half there.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from torch.profiler import ProfilerActivity, profile

from cost_fast.apps.report import atomic_report_dir, check_report_target
from cost_fast.grads import TaskGradients
from cost_fast.kernels import gram_stats
from cost_fast.methods import get_aggregator
from cost_fast.models import CelebACNN, batch_task_losses
from cost_fast.teleport import TeleportConfig, teleport
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.semantics import PublicSemantics
from cost_fast.yardstick import yardstick_task_gradients, yardstick_teleport


def _phases(num_tasks: int, width: int, batch_size: int, device: torch.device) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch_size, 3, 64, 64, generator=gen).to(device),
            torch.randint(0, 2, (batch_size, num_tasks), generator=gen).to(device),
        )
        for _ in range(2)
    ]
    config = TeleportConfig(lr=1e-3, rounds=1, guard_tolerance=float("inf"))
    fairgrad = get_aggregator("fairgrad")

    fast_model = CelebACNN(num_tasks, width).to(device)
    yardstick_model = copy.deepcopy(fast_model)
    teleport_model = copy.deepcopy(fast_model)
    fast_opt = torch.optim.Adam(fast_model.parameters(), lr=1e-3)
    yardstick_opt = torch.optim.Adam(yardstick_model.parameters(), lr=1e-3)
    engine = TaskGradients(fast_model.backbone.parameters(), num_tasks)
    yardstick_shared = list(yardstick_model.backbone.parameters())
    yardstick_buffer = torch.empty(sum(p.numel() for p in yardstick_shared), num_tasks, device=device)
    adapter = TeleportAdapter(teleport_model.backbone, rank=5)
    semantics = PublicSemantics()
    norms = torch.rand(num_tasks, generator=gen).to(device)
    ratios = semantics.ratio_weights(norms)

    def step_fast() -> None:
        fast_opt.zero_grad(set_to_none=True)
        losses = batch_task_losses(fast_model, data[0])
        stats = gram_stats(engine.compute(losses, retain_graph=True))
        w = fairgrad(stats.gram)
        (losses @ w).backward(inputs=list(fast_model.heads.parameters()))
        engine.combine(w)
        bool(stats.trigger)
        fast_opt.step()

    def step_yardstick() -> None:
        losses = batch_task_losses(yardstick_model, data[0])
        G = yardstick_task_gradients(yardstick_model, yardstick_shared, losses, yardstick_buffer)
        M = G.T @ G
        norms = G.norm(dim=0)
        g0 = G.mean(dim=1)
        cos = (G.T @ g0) / (norms * g0.norm())
        _ = [(norms[i].item(), cos[i].item()) for i in range(num_tasks)]
        w = fairgrad(M)
        yardstick_opt.zero_grad(set_to_none=True)
        (losses @ w).backward(inputs=list(yardstick_model.heads.parameters()))
        with torch.no_grad():
            d = G @ w
            offset = 0
            for p in yardstick_shared:
                p.grad = d[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        yardstick_opt.step()

    def teleport_fast() -> None:
        teleport(
            teleport_model,
            adapter,
            batch_task_losses,
            data,
            data[0],
            ratios=ratios,
            semantics=semantics,
            config=config,
            generator=torch.Generator(device).manual_seed(1),
        )

    def teleport_yardstick() -> None:
        yardstick_teleport(
            yardstick_model,
            "backbone",
            batch_task_losses,
            data,
            data[0],
            norms=norms,
            semantics=semantics,
            config=config,
            lr=1e-3,
            generator=torch.Generator(device).manual_seed(1),
        )

    return {
        "step_fast": step_fast,
        "step_yardstick": step_yardstick,
        "teleport_fast": teleport_fast,
        "teleport_yardstick": teleport_yardstick,
    }


def run_profile(
    out_dir: str | os.PathLike,
    *,
    num_tasks: int = 40,
    width: int = 8,
    batch_size: int = 8,
    rows: int = 12,
    device: str = "cpu",
    out: TextIO | None = None,
) -> Path:
    """Profile the four phases (module docstring) and write the report folder ``out_dir``."""
    for name, value in (("tasks", num_tasks), ("width", width), ("batch size", batch_size), ("rows", rows)):
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if batch_size < 2:
        raise ValueError(f"batch size must be ≥ 2 (the CNN's BatchNorm layers need two samples), got {batch_size}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    target = check_report_target(out_dir)
    with atomic_report_dir(target) as staging:
        lines = [f"cost-fast profile: CelebA-shaped CNN, K={num_tasks}, width={width}, batch={batch_size}, {dev}", ""]
        for name, fn in _phases(num_tasks, width, batch_size, dev).items():
            fn()  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - start
            prof.export_chrome_trace(str(staging / f"{name}.trace.json"))
            table = prof.key_averages().table(sort_by=sort_key, row_limit=rows)
            lines += [f"== {name}: {seconds * 1e3:.1f} ms ==", table, ""]
            if out is not None:
                print(f"{name:>20}: {seconds * 1e3:9.1f} ms", file=out, flush=True)
        (staging / "summary.txt").write_text("\n".join(lines), encoding="utf-8")
    if out is not None:
        print(f"report: {target}/summary.txt and one Chrome trace per phase", file=out)
    return target
