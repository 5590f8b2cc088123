"""Communication of one data-parallel step: the sharded engine against the naive all-reduce.

    python -m cost_fast.bench.distributed_comm OUT_FOLDER [--world R] [--tasks K] [--params P ...]

R processes (gloo on CPU; NCCL when each has a GPU) hold random K x P per-task gradient buffers
and run, 7 times each (median of the last 5), what one step needs to get the Gram matrix of the
global G and the update Gᵀw into every rank's gradient:

- ``sharded`` (``ShardedTaskGradients``): reduce-scatter of G along P, the K x K Gram matrix of
  the shard, an all-reduce of it, G_sᵀw, an all-gather of the update;
- ``naive_allreduce``: an all-reduce of the whole K x P buffer, then the Gram matrix and Gᵀw of
  all of it on every rank.

Both compute the same M and Gᵀw (checked). The bytes each rank sends are those of ring
collectives: reduce-scatter and all-gather (R-1)/R of their buffer, all-reduce 2(R-1)/R.
Writes ``distributed_<device>.json`` (the pytest-benchmark layout the report script reads,
stamped with device, versions and date) into OUT_FOLDER, which must be new, empty or a folder
cost-fast wrote before (``cost_fast.apps.report.MARKER``): a folder of the user's is never written
into.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cost_fast.apps.report import check_report_target, mark
from cost_fast.bench.stamp import stamp

REPEATS, WARMUP = 7, 2


def ring_bytes(kind: str, numbers: int, world: int, itemsize: int) -> float:
    """Bytes one rank sends in a ring collective over ``numbers`` elements."""
    factor = {"reduce_scatter": 1, "all_gather": 1, "all_reduce": 2}[kind]
    return factor * (world - 1) / world * numbers * itemsize


def _measure(K: int, P: int, world: int, rank: int, device: torch.device) -> list[dict]:
    """Both exchanges for one K x P buffer on this rank; rows of medians and bytes."""
    gen = torch.Generator().manual_seed(rank)
    G = torch.randn(K, P, generator=gen).to(device)
    w = torch.full((K,), 1.0 / K, device=device)
    shard = -(-P // world)
    packed = torch.zeros(world, K, shard, device=device)
    own = torch.empty(K, shard, device=device)
    gathered = torch.empty(world * shard, device=device)

    def sharded() -> tuple[torch.Tensor, torch.Tensor]:
        for r in range(world):
            begin, end = r * shard, min((r + 1) * shard, P)
            packed[r, :, : end - begin].copy_(G[:, begin:end])
        dist.reduce_scatter_tensor(own.view(-1), packed.view(-1))
        gram = own @ own.T
        dist.all_reduce(gram)
        dist.all_gather_into_tensor(gathered, own.T @ w)
        return gram, gathered[:P]

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        total = G.clone()
        dist.all_reduce(total)
        return total @ total.T, total.T @ w

    results = {}
    for name, fn in (("sharded", sharded), ("naive_allreduce", naive)):
        times = []
        for _ in range(REPEATS):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            gram, update = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        results[name] = (statistics.median(times[WARMUP:]), gram.cpu(), update.cpu())
    torch.testing.assert_close(results["sharded"][1], results["naive_allreduce"][1], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(results["sharded"][2], results["naive_allreduce"][2], rtol=1e-4, atol=1e-3)
    sent = {
        "sharded": ring_bytes("reduce_scatter", world * K * shard, world, 4)
        + ring_bytes("all_reduce", K * K, world, 4)
        + ring_bytes("all_gather", world * shard, world, 4),
        "naive_allreduce": ring_bytes("all_reduce", K * P, world, 4),
    }
    return [
        {"K": K, "P": P, "impl": name, "median": median, "bytes_sent_per_rank": sent[name]}
        for name, (median, _, _) in results.items()
    ]


def _worker(rank: int, world: int, shapes: list[tuple[int, int]], out: str, device_type: str) -> None:
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    rows = [row for K, P in shapes for row in _measure(K, P, world, rank, device)]
    if rank == 0:
        Path(out).write_text(json.dumps(rows), encoding="utf-8")
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> Path:
    """Run the comparison and write the JSON; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--world", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--tasks", type=int, default=40, help="K (default: 40)")
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000], help="P values")
    args = parser.parse_args(argv)
    device_type = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.world else "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    try:
        folder = check_report_target(args.out, merge=True)
    except ValueError as err:
        parser.error(str(err))
    folder.mkdir(exist_ok=True)
    mark(folder, [])
    raw = folder / ".distributed_rows.json"
    shapes = [(args.tasks, p) for p in args.params]
    mp.spawn(_worker, args=(args.world, shapes, str(raw), device_type), nprocs=args.world)
    rows = json.loads(raw.read_text())
    raw.unlink()
    benchmarks = [
        {
            "group": f"one step's communication K={r['K']} P={r['P']} world={args.world}",
            "name": f"comm[{r['impl']}-{r['K']}-{r['P']}]",
            "stats": {"median": r["median"]},
            "extra_info": {
                "impl": r["impl"],
                "K": r["K"],
                "P": r["P"],
                "world": args.world,
                "bytes_sent_per_rank": r["bytes_sent_per_rank"],
            },
        }
        for r in rows
    ]
    path = folder / f"distributed_{device_type}.json"
    device = torch.device("cuda" if device_type == "cuda" else "cpu")
    path.write_text(json.dumps({"stamp": stamp(device), "benchmarks": benchmarks}, indent=1), encoding="utf-8")
    mark(folder, [path.name])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
