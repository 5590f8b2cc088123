"""CPU-only guard for the GPU build: every Triton kernel configuration the dispatchers can launch
on CUDA compiles for sm_90 (H100/H200) without register spills and within the shared memory a
block may use (``cost_fast.kernels.compile_check``), and a forced tile that would not fit is
refused before launch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from cost_fast.kernels.gram_triton import (
    CUDA_TILES,
    SHARED_BYTES_PER_TILE_BYTE,
    SHARED_MEMORY_LIMIT,
    triton_gram_config,
)

HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton") is not None and (
    importlib.util.find_spec("triton.backends.nvidia") is not None
)


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton's NVIDIA backend (ptxas, cuobjdump)")
def test_every_cuda_configuration_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "cost_fast.kernels.compile_check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 0, done.stdout + done.stderr
    expected = sum(2 if is_fp32 else 4 for _, is_fp32 in CUDA_TILES) + 4 + 1 + 8  # Gram; noise: sums, writes
    assert len(lines) == expected and all(line.endswith(": ok") for line in lines), done.stdout


def test_the_tile_table_fits_the_shared_memory_bound() -> None:
    for (block_k, is_fp32), (block_p, _) in CUDA_TILES.items():
        tile_bytes = block_k * block_p * (4 if is_fp32 else 2)
        assert tile_bytes * SHARED_BYTES_PER_TILE_BYTE <= SHARED_MEMORY_LIMIT, (block_k, is_fp32)


def test_a_forced_tile_too_large_for_hopper_is_refused_before_launch() -> None:
    # the configuration that failed on an H200 with OutOfResources (262144 > 232448 bytes)
    with pytest.raises(ValueError, match="shared memory"):
        triton_gram_config(40, 100_003, torch.device("cuda"), block_p=256, dtype=torch.float32)


FOLDED_IR = """
%acc = scf.for %chunk = %pid to %n step %s iter_args(%acc_18 = %cst) -> (tensor<64x64xf32, #mma>) : i32 {
  %acc_30 = ttng.warp_group_dot %tile_28, %acc_29, %acc_18 {inputPrecision = 0 : i32, isAsync = true}
"""
UNFOLDED_IR = """
%comp:2 = scf.for %chunk = %pid to %n step %s iter_args(%acc = %cst, %comp_18 = %cst) -> (tensor<64x64xf32, #mma>, tensor<64x64xf32, #mma>) : i32 {
  %part_29 = ttng.warp_group_dot %tile_28, %part, %cst {inputPrecision = 0 : i32, isAsync = true}
  %y = arith.subf %part_30#0, %comp_18 : tensor<64x64xf32, #mma>
"""


def test_the_folded_accumulation_is_recognised_in_the_compiled_ir() -> None:
    # the IR the sm_90 compiler gave for ``acc += tl.dot(...)`` (folded) and for the kernel's
    # compensated sum (triton 3.9), in the spelling the compile check reads
    from cost_fast.kernels.compile_check import dot_accumulates_loop_carried

    assert dot_accumulates_loop_carried(FOLDED_IR)
    assert not dot_accumulates_loop_carried(UNFOLDED_IR)
    with pytest.raises(ValueError, match="no matrix product"):
        dot_accumulates_loop_carried("%x = arith.addf %a, %b")
