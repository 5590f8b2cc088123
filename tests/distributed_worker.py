"""A COST run on R gloo processes (or one plain process), for tests/test_distributed.py.

    python distributed_worker.py OUT WORLD METHOD [--uneven] [--nan-rank R --nan-step S] [--semantics S]
                                 [--float32] [--no-teleport] [--save-at S] [--resume CHECKPOINT]
                                 [--mismatch WHAT] [--rank0-loads WHAT]

The global batches of the tug-of-war problem (float64, or float32) are split by rows across the ranks
(evenly, or unevenly with --uneven); every rank trains its part with COST (teleports from step
1 on, one per 3-step epoch). Each rank writes OUT.rank<r>: its parameters, Adam's moments and
its step infos. WORLD = 1 runs one plain process on the whole batches. ``--save-at S``: rank 0
also writes OUT.ckpt before step S (model, optimizer and COST state dicts); ``--resume``: start
from such a file, at its step, on this run's world size. ``--mismatch WHAT``: the last rank
is built differently (``lr``, ``semantics``, ``seed``, ``init`` or ``method``); each rank writes
the error COST raised to OUT.rank<r>.error. ``--rank0-loads WHAT``: before step 3, rank 0 alone
loads a COST state (``cost``: its own from step 1) or other weights (``weights``); each rank writes
the error COST raised at the next step to OUT.rank<r>.error. Every warning is an error in the
ranks.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tug import K, Tug, tug_batches

from cost_fast import COST, TeleportConfig, TeleportSchedule, get_aggregator

STEPS = 7
BATCH = 12


def split(batch, world: int, rank: int, uneven: bool):
    x, y = batch
    if world == 1:
        return batch
    sizes = [BATCH // world] * world
    if uneven:  # e.g. 12 rows as [7, 5] or [5, 4, 3]
        sizes = [BATCH // world + (world - 1 - r) for r in range(world)]
        sizes[-1] = BATCH - sum(sizes[:-1])
    begin = sum(sizes[:rank])
    return x[begin : begin + sizes[rank]], y[begin : begin + sizes[rank]]


def train(rank: int, world: int, out: str, method: str, options: dict) -> None:
    uneven, nan_rank, nan_step = options["uneven"], options["nan_rank"], options["nan_step"]
    dtype = options["dtype"]
    odd = options["mismatch"] if rank == world - 1 and world > 1 else None
    torch.set_num_threads(1)
    warnings.simplefilter("error")  # no warning from COST's calls (e.g. deprecated collectives)
    if world > 1:
        # A file store, not TCP: rank 0 would host a TCPStore server whose thread can still be
        # serving the other ranks when rank 0 exits (CI once saw rank 0 abort at exit with
        # "terminate called without an active exception").
        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    torch.manual_seed(4 if odd == "init" else 3)
    model = Tug().to(dtype)
    batches = tug_batches(11, 4, dtype, size=BATCH)
    local = [split(b, world, rank, uneven) for b in batches]
    hparams = {"num_tasks": K} if method == "uw" else {"seed": 2} if method == "pcgrad" else {}
    base = get_aggregator("mgda" if odd == "method" else method, **hparams)
    params = list(model.parameters()) + (list(base.parameters()) if method == "uw" else [])
    optimizer = torch.optim.Adam(params, lr=2e-2 if odd == "lr" else 1e-2)

    def loss_fn(m, batch):
        x, y = batch
        return m.task_losses(x, y)

    try:
        cost = COST(
            model,
            model.backbone,
            base,
            optimizer,
            loss_fn=loss_fn,
            teleport_data=local[:2],
            semantics="paper" if odd == "semantics" else options["semantics"],
            schedule=TeleportSchedule(
                max_per_epoch=0 if options["no_teleport"] else 1, start_step=1, steps_per_epoch=3
            ),
            teleport=TeleportConfig(rounds=1),
            seed=6 if odd == "seed" else 5,
        )
    except ValueError as err:
        if options["mismatch"] is None:
            raise
        with open(f"{out}.rank{rank}.error", "w", encoding="utf-8") as file:
            file.write(str(err))
        _leave(world)
        return
    start = 0
    if options["resume"] is not None:
        saved = torch.load(options["resume"], weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        cost.load_state_dict(saved["cost"])
        start = saved["step"]
    infos = []
    early = None
    for step in range(start, STEPS):
        if step == 1:
            early = cost.state_dict()
        if step == 3 and rank == 0 and options["rank0_loads"] == "cost":
            cost.load_state_dict(early)
        if step == 3 and rank == 0 and options["rank0_loads"] == "weights":
            model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
        if step == 3 and options["rank0_loads"] is not None:
            try:
                cost.step(loss_fn(model, local[0]), local[0])
            except ValueError as err:
                with open(f"{out}.rank{rank}.error", "w", encoding="utf-8") as file:
                    file.write(str(err))
            _leave(world)
            return
        if step == options["save_at"] and rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "cost": cost.state_dict()}
            torch.save({**state, "step": step}, f"{out}.ckpt")
        batch = local[step % len(local)]
        losses = loss_fn(model, batch)
        if step == nan_step and rank == nan_rank:
            losses = losses * torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=dtype)
        info = cost.step(losses, batch)
        infos.append([info.step, info.teleported, info.htr or "", info.skipped or ""])
    state = {
        "params": [p.detach().clone() for p in params],
        "adam": [optimizer.state[p]["exp_avg_sq"].clone() for p in params if p in optimizer.state],
        "infos": infos,
        "cost": cost.state_dict(),
    }
    torch.save(state, f"{out}.rank{rank}")
    _leave(world)


def _leave(world: int) -> None:
    """End a rank once its files are written (closed): no rank tears down its connections while
    another still uses them, then the process ends without running C++ static destructors, in
    which gloo's threads have aborted a rank now and then at exit ("terminate called without
    an active exception") after every collective and file had completed."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv: list[str]) -> None:
    out, world, method = argv[0], int(argv[1]), argv[2]
    uneven = "--uneven" in argv
    nan_rank = int(argv[argv.index("--nan-rank") + 1]) if "--nan-rank" in argv else -1
    nan_step = int(argv[argv.index("--nan-step") + 1]) if "--nan-step" in argv else -1
    options = {
        "uneven": uneven,
        "nan_rank": nan_rank,
        "nan_step": nan_step,
        "semantics": argv[argv.index("--semantics") + 1] if "--semantics" in argv else "public",
        "dtype": torch.float32 if "--float32" in argv else torch.float64,
        "no_teleport": "--no-teleport" in argv,
        "save_at": int(argv[argv.index("--save-at") + 1]) if "--save-at" in argv else -1,
        "resume": argv[argv.index("--resume") + 1] if "--resume" in argv else None,
        "mismatch": argv[argv.index("--mismatch") + 1] if "--mismatch" in argv else None,
        "rank0_loads": argv[argv.index("--rank0-loads") + 1] if "--rank0-loads" in argv else None,
    }
    args = (world, out, method, options)
    if world == 1:
        train(0, *args)
    else:
        mp.spawn(train, args=args, nprocs=world)


if __name__ == "__main__":
    main(sys.argv[1:])
