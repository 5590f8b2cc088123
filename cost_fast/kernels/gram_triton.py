"""The fused Triton Gram kernel: one pass over G (K x P) that accumulates the Gram matrix in
fp32 registers, then a one-program epilogue with the statistics, so nothing crosses to the host.
The same math as ``cost_fast.kernels.gram_torch`` (its reference in the tests).

For 16-bit G each column chunk's product is formed from zero and added with IEEE fp32 adds,
compensated for K ≤ 64, so the error does not grow with P; fp32 G uses tf32x3 dot products.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from cost_fast.kernels.gram_torch import GramStats, check_grad_matrix

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional for the torch backend (e.g. on macOS)
    triton = None
    tl = None

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The whole (K x K) accumulator lives in one program's registers/shared memory.
MAX_TRITON_TASKS = 128
# Column offsets are int32 inside the kernel; row offsets are int64.
MAX_TRITON_COLUMNS = 2**31 - 2**16


def triton_available() -> bool:
    """True if triton imports."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class TritonGramConfig:
    """Launch configuration of the Gram kernel (see ``triton_gram_config``)."""

    block_k: int
    block_p: int
    num_programs: int
    num_warps: int
    num_stages: int


# Column tile and warps on CUDA per (padded K, fp32 or 16-bit input). Every entry compiles for
# sm_90 without register spills and within the H100's shared memory (tests/test_kernels_sm90.py
# compiles each one ahead of time, on CPU): tf32x3 (fp32 input) needs about three times the
# registers of a 16-bit tile, hence its narrower tiles.
CUDA_TILES: dict[tuple[int, bool], tuple[int, int]] = {
    (16, False): (128, 4),
    (32, False): (128, 4),
    (64, False): (128, 8),
    (128, False): (64, 8),
    (16, True): (128, 4),
    (32, True): (64, 8),
    (64, True): (64, 8),
    (128, True): (32, 8),
}
NUM_STAGES = 3
# Warps of the one-program epilogue per padded K (its K x K tile must fit in registers); its
# loop over the partials is not pipelined (one stage), which would hold several tiles at once.
EPILOGUE_WARPS = {16: 4, 32: 4, 64: 8, 128: 16}
EPILOGUE_STAGES = 1
EPILOGUE_ROWS = 32  # rows of M per pass of the epilogue
# Shared memory one block may use on an H100/H200 (227 KiB).
SHARED_MEMORY_LIMIT = 232448
# Largest measured shared memory of a partial-kernel config, per byte of its column tile
# (block_k x block_p x itemsize): 4 (a pipelined fp32 tf32x3 tile), so a forced block_p is
# refused above SHARED_MEMORY_LIMIT / 4 bytes of tile instead of failing at launch.
SHARED_BYTES_PER_TILE_BYTE = 4


def triton_gram_config(
    K: int, P: int, device: torch.device, block_p: int | None = None, dtype: torch.dtype = torch.float32
) -> TritonGramConfig:
    """Pick tile sizes and grid for a K x P matrix of ``dtype``.

    BLOCK_K is K padded to a power of two ≥ 16 (``tl.dot``'s minimum). On CUDA the column tile
    and warps come from ``CUDA_TILES``; a forced ``block_p`` whose tile would not fit in shared
    memory is refused with a ``ValueError``. The grid is persistent (a few programs per SM,
    each looping over column chunks) so that the partial Gram matrices to reduce stay few.
    Under the interpreter, programs run one after another in numpy, so wide column blocks and
    few programs are much faster there and exercise the same code.
    """
    block_k = max(16, _next_pow2(K))
    is_fp32 = dtype == torch.float32
    if device.type == "cuda":
        default_p, num_warps = CUDA_TILES[(block_k, is_fp32)]
        if block_p is None:
            block_p = default_p
        tile_bytes = block_k * block_p * (4 if is_fp32 else 2)
        if tile_bytes * SHARED_BYTES_PER_TILE_BYTE > SHARED_MEMORY_LIMIT:
            raise ValueError(
                f"block_p={block_p} at K={K} ({dtype}) needs more shared memory than a block may use "
                f"({SHARED_MEMORY_LIMIT} bytes); use at most {SHARED_MEMORY_LIMIT // (SHARED_BYTES_PER_TILE_BYTE * block_k * (4 if is_fp32 else 2))}"
            )
    else:
        block_p = block_p if block_p is not None else 4096
        num_warps = 4 if block_k <= 32 else 8
    num_chunks = triton.cdiv(P, block_p) if P > 0 else 0
    if device.type == "cuda":
        max_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        max_programs = 4
    num_programs = max(1, min(num_chunks, max_programs))
    return TritonGramConfig(block_k, block_p, num_programs, num_warps, NUM_STAGES)


if triton is not None:

    @triton.jit
    def _gram_partial_kernel(
        g_ptr,
        out_ptr,
        K,
        P,
        stride_k,
        num_chunks,
        BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr,
        USE_ATOMIC: tl.constexpr,
        IS_FP32: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Each program accumulates the Gram matrix of its own column chunks (chunk pid,
        # pid + nprog, ...) in fp32 registers, so every element of G is loaded exactly once.
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs_k = tl.arange(0, BLOCK_K)
        row_ptrs = g_ptr + offs_k.to(tl.int64)[:, None] * stride_k
        row_mask = offs_k[:, None] < K
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        comp = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)  # Kahan compensation of acc
        for chunk in range(pid, num_chunks, nprog):
            offs_p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
            tile = tl.load(row_ptrs + offs_p[None, :], mask=row_mask & (offs_p[None, :] < P), other=0.0)
            if UPCAST:
                # Triton 3.9's interpreter runs tl.dot on the raw bits of bf16; the fp32 products
                # of bf16/fp16 values are exact, so upcasting first computes the same sums.
                tile = tile.to(tl.float32)
            if IS_FP32:
                # tf32x3 keeps ~fp32 accuracy while using tensor cores; plain tf32 would not.
                # Triton folds this add into the product (dot(a, b, acc)); the H200 measured
                # 2e-7 to 9e-7 relative error up to P = 1e8 all the same.
                acc += tl.dot(tile, tl.trans(tile), input_precision="tf32x3")
            else:
                # 16-bit input: each chunk's product starts from zero and is added to acc with
                # IEEE fp32 adds, so the tensor cores' own accumulation (not round-to-nearest)
                # never spans more than one chunk and the error does not grow with P. A plain
                # ``acc += tl.dot(...)`` is folded into dot(a, b, acc), which the H200 measured
                # as an error growing with P (bf16, K = 40: 4.9e-6 at P = 1e6, 1.0e-3 at 1e8);
                # the subtractions below are not folded (the sm_90 compile check fails if a
                # product accumulates into the loop's carried sum).
                if UPCAST:
                    part = tl.dot(tile, tl.trans(tile), input_precision="tf32x3")
                else:
                    part = tl.dot(tile, tl.trans(tile))
                if BLOCK_K <= 64:
                    # compensated (Kahan) sum: the error of the adds stays at fp32 rounding
                    y = part - comp
                    total = acc + y
                    comp = (total - acc) - y
                    acc = total
                else:
                    # a 128 x 128 compensation tile would spill registers: a plain two-level sum
                    acc = acc - (0.0 - part)
        tile_offs = offs_k[:, None] * BLOCK_K + offs_k[None, :]
        if USE_ATOMIC:
            tl.atomic_add(out_ptr + tile_offs, acc)
        else:
            tl.store(out_ptr + pid * BLOCK_K * BLOCK_K + tile_offs, acc)

    @triton.jit
    def _gram_epilogue_kernel(
        part_ptr,
        num_parts,
        K,
        gram_ptr,
        norms_ptr,
        dot_ptr,
        cos_ptr,
        mean_norm_ptr,
        counts_ptr,
        flags_ptr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        # One program: reduce the partial Gram matrices in a fixed order (deterministic), then
        # the O(K²) statistics of the module docstring, mirroring ``stats_from_gram``. Rows are
        # taken BLOCK_R at a time so that a 128 x 128 matrix never sits in registers whole.
        cols = tl.arange(0, BLOCK_K)
        col_valid = cols < K
        total = tl.full((), 0.0, tl.float32)
        num_dominated = tl.full((), 0, tl.int64)
        num_pairs = tl.full((), 0, tl.int64)
        num_bad = tl.full((), 0, tl.int32)
        for r0 in tl.static_range(0, BLOCK_K, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_valid = rows < K
            tile_offs = rows[:, None] * BLOCK_K + cols[None, :]
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for i in range(num_parts):
                acc += tl.load(part_ptr + i * BLOCK_K * BLOCK_K + tile_offs)
            valid = row_valid[:, None] & col_valid[None, :]
            m = tl.where(valid, acc, 0.0)
            tl.store(gram_ptr + rows[:, None] * K + cols[None, :], m, mask=valid)
            diag = tl.sum(tl.where(rows[:, None] == cols[None, :], m, 0.0), axis=1)
            dot = tl.sum(m, axis=1) / K
            tl.store(norms_ptr + rows, tl.sqrt(tl.maximum(diag, 0.0)), mask=row_valid)
            tl.store(dot_ptr + rows, dot, mask=row_valid)
            total += tl.sum(dot, axis=0)
            num_dominated += tl.sum(((dot < 0) & row_valid).to(tl.int64), axis=0)
            upper = (rows[:, None] < cols[None, :]) & valid
            num_pairs += tl.sum(tl.sum(((m < 0) & upper).to(tl.int64), axis=1), axis=0)
            bad = (m != m) | (tl.abs(m) == float("inf"))
            num_bad += tl.sum(tl.sum((bad & valid).to(tl.int32), axis=1), axis=0)
        mean_norm = tl.sqrt(tl.maximum(total / K, 0.0))
        tl.debug_barrier()  # the norms and dots stored above are read back by other threads
        norms = tl.load(norms_ptr + cols, mask=col_valid, other=0.0)
        dot = tl.load(dot_ptr + cols, mask=col_valid, other=0.0)
        denom = norms * mean_norm
        cos = tl.where(denom > 0, dot / denom, 0.0)
        cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
        tl.store(cos_ptr + cols, cos, mask=col_valid)
        tl.store(mean_norm_ptr, mean_norm)
        nonfinite = num_bad > 0
        trigger = (num_bad == 0) & (2 * num_dominated >= K)
        tl.store(counts_ptr, num_dominated)
        tl.store(counts_ptr + 1, num_pairs)
        tl.store(flags_ptr, trigger)
        tl.store(flags_ptr + 1, nonfinite)


def check_triton_usable(G: torch.Tensor) -> None:
    """Raise a ``RuntimeError``/``ValueError`` if the Triton kernel cannot run on ``G``."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if G.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton Gram kernel takes float32, float16 or bfloat16, got {G.dtype} (use backend='torch')"
        )
    K, P = G.shape
    if K > MAX_TRITON_TASKS:
        raise ValueError(f"the Triton Gram kernel handles K ≤ {MAX_TRITON_TASKS} tasks, got K = {K}")
    if P > MAX_TRITON_COLUMNS:
        raise ValueError(f"the Triton Gram kernel handles P ≤ {MAX_TRITON_COLUMNS} columns, got P = {P}")
    if G.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' on a {G.device.type} tensor needs TRITON_INTERPRET=1 set before "
            "triton is imported (or use backend='torch')"
        )


def gram_stats_triton(G: torch.Tensor, *, deterministic: bool = False, block_p: int | None = None) -> GramStats:
    """``gram_stats`` through the fused Triton kernels (see the module docstring).

    ``deterministic=False`` adds each program's partial Gram matrix into one accumulator with
    atomics (order varies run to run); ``deterministic=True`` stores the partials and sums them
    in a fixed order, which is bitwise reproducible. ``block_p`` overrides the column tile.
    """
    check_grad_matrix(G)
    check_triton_usable(G)
    if G.shape[1] > 1 and G.stride(1) != 1:
        G = G.contiguous()  # the kernel needs unit column stride; any row stride is fine
    K, P = G.shape
    cfg = triton_gram_config(K, P, G.device, block_p, G.dtype)
    num_chunks = triton.cdiv(P, cfg.block_p)
    num_parts = 1 if not deterministic else cfg.num_programs
    tile = cfg.block_k * cfg.block_k
    dev = G.device
    partials = torch.zeros(num_parts * tile, dtype=torch.float32, device=dev)
    _gram_partial_kernel[(cfg.num_programs,)](
        G,
        partials,
        K,
        P,
        G.stride(0),
        num_chunks,
        BLOCK_K=cfg.block_k,
        BLOCK_P=cfg.block_p,
        USE_ATOMIC=not deterministic,
        IS_FP32=G.dtype == torch.float32,
        UPCAST=G.device.type != "cuda",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    gram = torch.empty((K, K), dtype=torch.float32, device=dev)
    vectors = torch.empty((3, K), dtype=torch.float32, device=dev)
    mean_norm = torch.empty((), dtype=torch.float32, device=dev)
    counts = torch.empty(2, dtype=torch.int64, device=dev)
    flags = torch.empty(2, dtype=torch.bool, device=dev)
    _gram_epilogue_kernel[(1,)](
        partials,
        num_parts,
        K,
        gram,
        vectors[0],
        vectors[1],
        vectors[2],
        mean_norm,
        counts,
        flags,
        BLOCK_K=cfg.block_k,
        BLOCK_R=min(cfg.block_k, EPILOGUE_ROWS),
        num_warps=EPILOGUE_WARPS[cfg.block_k],
        num_stages=EPILOGUE_STAGES,
    )
    return GramStats(
        gram=gram,
        norms=vectors[0],
        dot_mean=vectors[1],
        cos_mean=vectors[2],
        mean_norm=mean_norm,
        num_dominated=counts[0],
        num_conflicting_pairs=counts[1],
        trigger=flags[0],
        nonfinite=flags[1],
    )
