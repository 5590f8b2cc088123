"""gram_stats against the plain torch way, for K in {2, 3, 10, 40} and P in {1e6, 1e7 (, 1e8 on a GPU)}.

The plain torch way is what a straightforward implementation (and the public COST code) does:
``G @ G.T``, then norms, the mean gradient, its dot products and cosines as separate passes over
G, the counts, and one ``.item()`` per task to read norms and cosines on the host.

Run:  pytest bench/test_bench_gram.py --benchmark-json=bench/results/gram_<device>.json
"""

from __future__ import annotations

import math

import pytest
import torch

from cost_fast.bench.stamp import bench_device, synchronize
from cost_fast.kernels import gram_stats

DEVICE = bench_device()
KS = [2, 3, 10, 40]
PS = [1_000_000, 10_000_000] + ([100_000_000] if DEVICE.type == "cuda" else [])
IMPLS = ["plain_torch", "gram_stats_torch"] + (["gram_stats_triton"] if DEVICE.type == "cuda" else [])


def plain_torch_way(G: torch.Tensor) -> bool:
    K = G.shape[0]
    M = G @ G.T
    norms = G.norm(dim=1)
    g0 = G.mean(dim=0)
    cos = (G @ g0) / (norms * g0.norm())
    num_pairs = torch.triu(M < 0, diagonal=1).sum()
    dominated = (cos < 0).sum()
    _host = [(norms[i].item(), cos[i].item()) for i in range(K)]
    return dominated.item() >= math.ceil(K / 2) and num_pairs.item() >= 0


def ours(backend: str):
    def run(G: torch.Tensor) -> bool:
        return bool(gram_stats(G, backend=backend).trigger)  # the one host read COST's trigger needs

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("P", PS)
@pytest.mark.parametrize("K", KS)
def test_gram_stats_speed(benchmark, K: int, P: int, impl: str) -> None:
    G = torch.randn(K, P, device=DEVICE)
    fn = plain_torch_way if impl == "plain_torch" else ours(impl.removeprefix("gram_stats_"))

    def timed() -> bool:
        out = fn(G)
        synchronize(DEVICE)
        return out

    timed()  # compile / warm up
    benchmark.group = f"gram K={K} P={P:.0e}"
    benchmark.extra_info.update(K=K, P=P, impl=impl, bytes=K * P * G.element_size())
    rounds = 5 if K * P >= 10**8 and DEVICE.type == "cpu" else 20
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
