"""Gram matrix of K task gradients and the conflict statistics COST's trigger needs.

Given the per-task gradients of the shared parameters as the rows of ``G`` (K x P), every
statistic here is a function of the Gram matrix ``M = G Gᵀ`` alone:

    ‖g_i‖        = sqrt(M_ii)
    g0           = (1/K) Σ_j g_j                      (the mean gradient)
    g_i · g0     = (1/K) Σ_j M_ij
    ‖g0‖         = sqrt((1/K²) Σ_ij M_ij)
    cos(g_i, g0) = (g_i · g0) / (‖g_i‖ ‖g0‖)          (0 where a norm is 0)
    dominated    = #{i : cos(g_i, g0) < 0}
    pairs        = #{i < j : cos(g_i, g_j) < 0} = #{i < j : M_ij < 0}
    trigger      = finite(M) and dominated ≥ ⌈K/2⌉    (COST, Eq. 4)

So one pass over G that produces M is enough; the statistics are an O(K²) epilogue. The Triton
path reads every element of G exactly once (fp32 accumulation; for 16-bit G each column chunk's
product is formed from zero and added with IEEE fp32 adds, compensated for K ≤ 64, so the
error does not grow with P) and computes the epilogue in a second, single-program kernel, so
nothing crosses to the host (``cost_fast.kernels.gram_triton``). ``gram_stats_torch`` is the
same math in plain torch (``cost_fast.kernels.gram_torch``). This module chooses between them.
"""

from __future__ import annotations

from typing import Literal

import torch

from cost_fast.kernels.gram_torch import GramStats, check_grad_matrix, gram_stats_torch
from cost_fast.kernels.gram_triton import MAX_TRITON_COLUMNS, MAX_TRITON_TASKS, TRITON_DTYPES, gram_stats_triton, triton

Backend = Literal["auto", "triton", "torch"]

# backend="auto" sends fp32 gradients of up to this many tasks to torch (see ``resolve_backend``).
TORCH_FP32_MAX_TASKS = 64


def resolve_backend(G: torch.Tensor, backend: Backend) -> Literal["triton", "torch"]:
    """``"auto"`` -> Triton for CUDA tensors it can handle and is faster on, torch otherwise.

    fp32 with K ≤ ``TORCH_FP32_MAX_TASKS`` goes to torch: on an H200 the torch backend was faster
    there (K = 3, 10, 40 at P = 1e7 and 1e8) and Triton faster at K = 128 (``docs/benchmarks.md``;
    measured with an earlier tile table than today's ``CUDA_TILES``)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend != "auto":
        return backend
    usable = (
        triton is not None
        and G.device.type == "cuda"
        and G.dtype in TRITON_DTYPES
        and G.shape[0] <= MAX_TRITON_TASKS
        and G.shape[1] <= MAX_TRITON_COLUMNS
        and not (G.dtype == torch.float32 and G.shape[0] <= TORCH_FP32_MAX_TASKS)
    )
    return "triton" if usable else "torch"


def gram_stats(G: torch.Tensor, *, backend: Backend = "auto", deterministic: bool = False) -> GramStats:
    """Gram matrix ``M = G Gᵀ`` of K task gradients and the conflict statistics derived from it.

    Args:
        G: (K, P) per-task gradients, one task per row; float32, float16 or bfloat16 (and float64
            on the torch backend, computed in float64). Any row stride is accepted without a copy (e.g. the buffer of ``cost_fast.grads``).
        backend: ``"triton"`` (fused kernel; on CPU tensors only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (``gram_stats_torch``), or ``"auto"`` (Triton on CUDA where it is the
            faster one, see ``resolve_backend``; torch otherwise).
        deterministic: Triton only: bitwise-identical results run to run (fixed-order reduction
            instead of atomics). The torch backend (a chunked batched matmul, ``gram_torch``)
            is deterministic already and ignores it.

    Returns:
        A ``GramStats`` of device tensors, with no host synchronization. Accumulation is fp32
        (fp64 for fp64 input).

    Formulas: see the module docstring; ``trigger`` is ``dominated ≥ ⌈K/2⌉`` on finite input.
    """
    check_grad_matrix(G)
    if resolve_backend(G, backend) == "triton":
        return gram_stats_triton(G, deterministic=deterministic)
    return gram_stats_torch(G)
