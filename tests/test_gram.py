"""gram_stats (Triton through TRITON_INTERPRET=1 on CPU, and torch) against a float64 reference.

Tolerances are relative to the scale of each quantity, since fp32 accumulation error grows with
the magnitudes summed, not with the (possibly cancelling) result:

| quantity     | bound on |ours - float64|                                  |
|--------------|---------------------------------------------------------------|
| M_ij         | RTOL · ‖g_i‖ ‖g_j‖                                            |
| ‖g_i‖        | RTOL · ‖g_i‖                                                  |
| g_i · g0     | RTOL · ‖g_i‖ · mean_j ‖g_j‖                                    |
| cos(g_i, g0) | RTOL · mean_j ‖g_j‖ / ‖g0‖ (checked where ‖g0‖ is not tiny)   |
| counts       | between the counts of the clearly negative and the possibly    |
|              | negative entries, the margin being the bound above             |
"""

from __future__ import annotations

import math

import pytest
import torch

from cost_fast.kernels import gram_stats, gram_stats_torch, gram_stats_triton, stats_from_gram
from cost_fast.kernels.gram_triton import MAX_TRITON_TASKS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Measured on CPU: ≤ 1.2e-6 for every case below, both backends. On a GPU, fp32 input goes
# through tf32x3 tensor-core products (~2^-22 relative each), hence the margin.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
KS = [1, 2, 3, 7, 16, 40, 64]
PS = [1, 127, 4097, 1_000_003]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


def make_grads(K: int, P: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a common component, and half of the tasks flipped so that conflicts occur."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(1, P, generator=gen)
    G = torch.randn(K, P, generator=gen) + 0.5 * common
    G[: K // 2] *= -0.7
    G *= torch.logspace(-1, 1, K)[:, None]  # norms spread over two decades
    return G.to(dtype).to(DEVICE)


def assert_matches_float64(stats, G: torch.Tensor, rtol: float) -> None:
    G64 = G.double().cpu()
    K = G64.shape[0]
    M64 = G64 @ G64.T
    n64 = M64.diagonal().sqrt()
    nn = n64[:, None] * n64[None, :]
    dot64 = M64.mean(dim=1)
    n0 = dot64.mean().clamp_min(0).sqrt()
    nbar = n64.mean()
    tiny = 1e-30

    gram = stats.gram.double().cpu()
    assert gram.shape == (K, K) and stats.gram.dtype == torch.float32
    assert ((gram - M64).abs() <= rtol * nn + tiny).all(), "Gram matrix"
    assert ((stats.norms.double().cpu() - n64).abs() <= rtol * n64 + tiny).all(), "norms"
    dot_margin = rtol * n64 * nbar + tiny
    assert ((stats.dot_mean.double().cpu() - dot64).abs() <= dot_margin).all(), "g_i . g0"
    assert abs(stats.mean_norm.item() - n0.item()) <= rtol * nbar.item() + tiny, "||g0||"
    if n0 > 1e-3 * nbar:
        cos64 = torch.where(n64 * n0 > 0, dot64 / (n64 * n0), torch.zeros_like(dot64))
        cos_margin = rtol * nbar / n0 * 10 + 1e-6
        assert ((stats.cos_mean.double().cpu() - cos64).abs() <= cos_margin).all(), "cos(g_i, g0)"
    assert (stats.cos_mean.abs() <= 1).all()

    lo = int((dot64 < -dot_margin).sum())
    hi = int((dot64 < dot_margin).sum())
    dominated = int(stats.num_dominated)
    assert lo <= dominated <= hi, f"dominated {dominated} not in [{lo}, {hi}]"
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool), diagonal=1)
    pair_margin = rtol * nn + tiny
    p_lo = int(((M64 < -pair_margin) & upper).sum())
    p_hi = int(((M64 < pair_margin) & upper).sum())
    assert p_lo <= int(stats.num_conflicting_pairs) <= p_hi, "conflicting pairs"
    need = math.ceil(K / 2)
    if lo >= need or hi < need:  # the decision is not a rounding tie
        assert bool(stats.trigger) == (lo >= need)
    assert not bool(stats.nonfinite)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P", PS)
@pytest.mark.parametrize("K", KS)
def test_gram_stats_matches_float64(K: int, P: int, dtype: torch.dtype, backend: str) -> None:
    G = make_grads(K, P, dtype, seed=K * 7 + P)
    stats = gram_stats(G, backend=backend)
    assert_matches_float64(stats, G, RTOL[dtype])
    for field in ("gram", "norms", "dot_mean", "cos_mean", "num_dominated", "trigger", "nonfinite"):
        assert getattr(stats, field).device.type == G.device.type


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("K", "P"), [(1, 127), (3, 4097), (16, 1000), (40, 129), (64, 17)])
def test_triton_small_blocks_many_programs(K: int, P: int, dtype: torch.dtype) -> None:
    """GPU-sized column tiles: many chunks per program and a ragged last chunk."""
    G = make_grads(K, P, dtype, seed=3)
    for deterministic in (False, True):
        stats = gram_stats_triton(G, deterministic=deterministic, block_p=16)
        assert_matches_float64(stats, G, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_is_bitwise_reproducible(dtype: torch.dtype) -> None:
    G = make_grads(40, 100_003, dtype, seed=1)
    block_p = None if G.is_cuda else 256  # on CUDA the tile table's own (compiled for sm_90 in CI)
    first = gram_stats_triton(G, deterministic=True, block_p=block_p)
    for _ in range(2):
        again = gram_stats_triton(G, deterministic=True, block_p=block_p)
        for field in ("gram", "norms", "dot_mean", "cos_mean", "mean_norm", "num_dominated", "trigger"):
            assert torch.equal(getattr(first, field), getattr(again, field)), field
    atomic = gram_stats_triton(G, deterministic=False, block_p=block_p)
    assert torch.allclose(atomic.gram, first.gram, rtol=1e-5, atol=1e-3)


def test_known_values_two_tasks() -> None:
    """g1 = (1, 0), g2 = (-3, 0): g0 = (-1, 0), so task 1 conflicts with the mean, task 2 not."""
    G = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], device=DEVICE)
    for backend in BACKENDS:
        s = gram_stats(G, backend=backend)
        torch.testing.assert_close(s.gram.cpu(), torch.tensor([[1.0, -3.0], [-3.0, 9.0]]))
        torch.testing.assert_close(s.norms.cpu(), torch.tensor([1.0, 3.0]))
        torch.testing.assert_close(s.dot_mean.cpu(), torch.tensor([-1.0, 3.0]))
        torch.testing.assert_close(s.cos_mean.cpu(), torch.tensor([-1.0, 1.0]))
        torch.testing.assert_close(s.mean_norm.cpu(), torch.tensor(1.0))
        assert int(s.num_dominated) == 1 and int(s.num_conflicting_pairs) == 1
        assert bool(s.trigger)  # 1 ≥ ⌈2/2⌉


@pytest.mark.parametrize("backend", BACKENDS)
def test_trigger_threshold_is_half_rounded_up(backend: str) -> None:
    # K = 3, g0 = (-1/3, -1/3): tasks 1 and 2 conflict with the mean, 2 ≥ ⌈3/2⌉.
    two_of_three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, -2.0]], device=DEVICE)
    s = gram_stats(two_of_three, backend=backend)
    assert int(s.num_dominated) == 2 and bool(s.trigger)
    # g0 = (1/3, 2/3): only task 3 conflicts, 1 < 2.
    one_of_three = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, -1.0]], device=DEVICE)
    s = gram_stats(one_of_three, backend=backend)
    assert int(s.num_dominated) == 1 and not bool(s.trigger)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_task_has_no_conflict(backend: str) -> None:
    G = torch.randn(1, 333, device=DEVICE)
    s = gram_stats(G, backend=backend)
    assert int(s.num_dominated) == 0 and int(s.num_conflicting_pairs) == 0 and not bool(s.trigger)
    torch.testing.assert_close(s.cos_mean.cpu(), torch.ones(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradients_give_zero_cosines(backend: str) -> None:
    G = torch.zeros(4, 100, device=DEVICE)
    G[1] = 1.0
    s = gram_stats(G, backend=backend)
    torch.testing.assert_close(s.cos_mean.cpu(), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert int(s.num_dominated) == 0 and not bool(s.trigger) and not bool(s.nonfinite)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [0, 5])
def test_empty_columns(backend: str, P: int) -> None:
    G = torch.zeros(3, P, device=DEVICE)
    s = gram_stats(G, backend=backend)
    assert torch.equal(s.gram.cpu(), torch.zeros(3, 3))
    assert int(s.num_dominated) == 0 and not bool(s.trigger) and not bool(s.nonfinite)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e30])
def test_nonfinite_never_triggers(backend: str, bad: float) -> None:
    # Without the bad value, most tasks conflict with the mean and the trigger fires.
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-2.0, -2.0, 0.0]], device=DEVICE).repeat(1, 50)
    assert bool(gram_stats(G, backend=backend).trigger)
    G[0, 7] = bad
    if bad == 1e30:  # finite input whose Gram matrix overflows fp32
        G[0, 8] = bad
    s = gram_stats(G, backend=backend)
    assert bool(s.nonfinite) and not bool(s.trigger)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_strided_view_is_read_in_place(backend: str) -> None:
    base = make_grads(5, 1000, torch.float32)
    G = base[:, 100:900]  # row stride 1000, unit column stride: no copy needed
    s = gram_stats(G, backend=backend)
    assert_matches_float64(s, G, RTOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_strided_input(backend: str) -> None:
    G = make_grads(6, 300, torch.float32).T.contiguous().T
    assert G.stride(1) != 1
    assert_matches_float64(gram_stats(G, backend=backend), G, RTOL[torch.float32])


def test_stats_from_gram_matches_reference() -> None:
    G = make_grads(7, 500, torch.float32)
    a = stats_from_gram(G @ G.T)
    b = gram_stats_torch(G)
    assert torch.equal(a.gram, b.gram) and torch.equal(a.trigger, b.trigger)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.zeros(5), ValueError, "shape"),
        (torch.zeros(2, 3, 4), ValueError, "shape"),
        (torch.zeros(0, 10), ValueError, "K = 0"),
        (torch.zeros(2, 10, dtype=torch.int32), TypeError, "float32"),
        (torch.zeros(2, 10, dtype=torch.complex64), TypeError, "float32"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_named(bad, error, message: str) -> None:
    for backend in BACKENDS:
        with pytest.raises(error, match=message):
            gram_stats(bad, backend=backend)


def test_float64_runs_in_float64_on_the_torch_backend() -> None:
    G = make_grads(5, 40_000, torch.float64, seed=9)
    exact = G @ G.T
    for backend in ("auto", "torch"):
        stats = gram_stats(G, backend=backend)
        assert stats.gram.dtype == torch.float64 and stats.cos_mean.dtype == torch.float64
        torch.testing.assert_close(stats.gram, exact, rtol=1e-13, atol=0)
        torch.testing.assert_close(stats.norms, exact.diagonal().sqrt(), rtol=1e-13, atol=0)
    with pytest.raises(TypeError, match="backend='torch'"):
        gram_stats(G, backend="triton")


def test_bad_backend_and_too_many_tasks() -> None:
    G = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="backend"):
        gram_stats(G, backend="cuda")
    with pytest.raises(ValueError, match="K ≤"):
        gram_stats(torch.zeros(MAX_TRITON_TASKS + 1, 4, device=DEVICE), backend="triton")
    # auto falls back to torch where the kernel does not apply
    s = gram_stats(torch.ones(MAX_TRITON_TASKS + 1, 4, device=DEVICE), backend="auto")
    assert s.gram.shape == (MAX_TRITON_TASKS + 1,) * 2
