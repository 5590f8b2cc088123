"""Ahead-of-time check of every Triton kernel configuration for Hopper, on a machine without a GPU.

Each configuration the dispatchers can launch on CUDA (``gram_triton.CUDA_TILES`` for the Gram kernel,
both reductions and every input dtype; the epilogue per padded K; the tensorwise noise's two
kernels per output dtype) is
compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90: H100/H200), and the
cubin is read with the ``cuobjdump`` bundled with triton. A configuration fails if it spills
registers (stack or local memory in use) or needs more shared memory than a block may use
(``gram_triton.SHARED_MEMORY_LIMIT``), or, for 16-bit input, if a matrix product's accumulator is the
loop-carried sum (the compiler folded ``acc + dot(a, b)`` into ``dot(a, b, acc)``, which makes
the Gram kernel's error grow with P), so that a configuration that cannot launch on Hopper, runs slowly there or
loses the compensated sum is caught by CI on CPU.

    python -m cost_fast.kernels.compile_check      # prints one line per configuration; exit 1 on a failure

Needs triton with its NVIDIA backend and ``TRITON_INTERPRET`` unset (the interpreter replaces
the kernels with Python functions that cannot be compiled).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile

TARGET_ARCH = 90


@dataclasses.dataclass(frozen=True)
class CompiledConfig:
    """One compiled configuration and what the compiler reports for it."""

    kernel: str
    config: str
    shared: int  # dynamic shared memory, bytes
    registers: int
    stack: int  # bytes of stack per thread: > 0 means spills
    local: int  # bytes of local memory per thread
    loop_carried_dot: bool = False  # a dot accumulates into a value carried by its loop

    @property
    def problems(self) -> list[str]:
        """Why this configuration must not ship (empty when it may)."""
        from cost_fast.kernels.gram_triton import SHARED_MEMORY_LIMIT

        found = []
        if self.stack or self.local:
            found.append(f"register spills (stack {self.stack} B, local {self.local} B)")
        if self.shared > SHARED_MEMORY_LIMIT:
            found.append(f"shared memory {self.shared} > {SHARED_MEMORY_LIMIT}")
        if self.loop_carried_dot:
            found.append("a matrix product accumulates into the loop-carried sum (add folded into the dot)")
        return found


def dot_accumulates_loop_carried(ttgir: str) -> bool:
    """Whether a matrix product in the TritonGPU IR takes a loop's carried value as its
    accumulator (C operand): ``scf.for ... iter_args(%x = ...)`` then ``dot %a, %b, %x``."""
    carried = set(re.findall(r"iter_args\((.*?)\)\s*->", ttgir))
    names = {name for group in carried for name in re.findall(r"(%[\w#]+) =", group)}
    accumulators = re.findall(r"(?:tt\.dot|warp_group_dot|ttng\.\w*mma\w*)\s+%[\w#]+,\s*%[\w#]+,\s*(%[\w#]+)", ttgir)
    if not accumulators:  # a new IR spelling must fail loudly, not pass unchecked
        raise ValueError("no matrix product found in the TritonGPU IR: update dot_accumulates_loop_carried")
    return any(acc in names for acc in accumulators)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _compile(
    fn,
    signature: dict,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    kernel: str,
    config: str,
    *,
    unfolded_sum: bool = False,
):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", TARGET_ARCH, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        report = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{report}")
    registers, stack, local = map(int, match.groups())
    fused = unfolded_sum and dot_accumulates_loop_carried(compiled.asm["ttgir"])
    return CompiledConfig(kernel, config, compiled.metadata.shared, registers, stack, local, fused)


def gram_configs() -> list[CompiledConfig]:
    """Every CUDA configuration of the Gram kernels, compiled for sm_90."""
    from cost_fast.kernels import gram_triton as gram

    results = []
    for (block_k, is_fp32), (block_p, num_warps) in sorted(gram.CUDA_TILES.items()):
        for dtype in ("fp32",) if is_fp32 else ("fp16", "bf16"):
            for atomic in (True, False):
                signature = {
                    "g_ptr": f"*{dtype}",
                    "out_ptr": "*fp32",
                    "K": "i32",
                    "P": "i32",
                    "stride_k": "i32",
                    "num_chunks": "i32",
                    "BLOCK_K": "constexpr",
                    "BLOCK_P": "constexpr",
                    "USE_ATOMIC": "constexpr",
                    "IS_FP32": "constexpr",
                    "UPCAST": "constexpr",
                }
                constexprs = {
                    "BLOCK_K": block_k,
                    "BLOCK_P": block_p,
                    "USE_ATOMIC": atomic,
                    "IS_FP32": is_fp32,
                    "UPCAST": False,
                }
                config = f"block_k={block_k} block_p={block_p} {dtype} warps={num_warps} atomic={atomic}"
                results.append(
                    _compile(
                        gram._gram_partial_kernel,
                        signature,
                        constexprs,
                        num_warps,
                        gram.NUM_STAGES,
                        "gram_partial",
                        config,
                        unfolded_sum=not is_fp32,  # 16-bit input: chunk products added outside the MMA
                    )
                )
        if is_fp32:  # the epilogue depends on block_k only
            signature = {
                "part_ptr": "*fp32",
                "num_parts": "i32",
                "K": "i32",
                "gram_ptr": "*fp32",
                "norms_ptr": "*fp32",
                "dot_ptr": "*fp32",
                "cos_ptr": "*fp32",
                "mean_norm_ptr": "*fp32",
                "counts_ptr": "*i64",
                "flags_ptr": "*i1",
                "BLOCK_K": "constexpr",
                "BLOCK_R": "constexpr",
            }
            warps = gram.EPILOGUE_WARPS[block_k]
            results.append(
                _compile(
                    gram._gram_epilogue_kernel,
                    signature,
                    {"BLOCK_K": block_k, "BLOCK_R": min(block_k, gram.EPILOGUE_ROWS)},
                    warps,
                    gram.EPILOGUE_STAGES,
                    "gram_epilogue",
                    f"block_k={block_k} warps={warps}",
                )
            )
    return results


def noise_configs() -> list[CompiledConfig]:
    """The tensorwise noise's two kernels (``tensorwise_noise``), for every output dtype and
    with and without a base, compiled for sm_90 (launched with triton's default 4 warps)."""
    from cost_fast.kernels import tensorwise_noise as noise

    table = {"starts_ptr": "*i32", "ends_ptr": "*i32"}
    results = [
        _compile(
            noise._block_sums_kernel,
            {"partials_ptr": "*fp32", **table, "seed_ptr": "*i64", "num_blocks": "i32", "BLOCK": "constexpr"},
            {"BLOCK": noise.BLOCK},
            4,
            3,
            "noise_sums",
            f"block={noise.BLOCK}",
        )
    ]
    for dtype in ("fp16", "bf16", "fp32", "fp64"):
        for has_base in (False, True):
            signature = {
                "out_ptr": f"*{dtype}",
                "base_ptr": f"*{dtype}",
                "partials_ptr": "*fp32",
                **table,
                "first_ptr": "*i32",
                "count_ptr": "*i32",
                "seed_ptr": "*i64",
                "norm": "fp32",
                "num_blocks": "i32",
                "total": "i32",
                "HAS_BASE": "constexpr",
                "WIDE": "constexpr",
                "BLOCK": "constexpr",
            }
            config = f"block={noise.BLOCK} {dtype} base={has_base}"
            constexprs = {"HAS_BASE": has_base, "WIDE": dtype == "fp64", "BLOCK": noise.BLOCK}
            results.append(_compile(noise._write_noise_kernel, signature, constexprs, 4, 3, "noise_write", config))
    return results


def main() -> int:
    """Compile every configuration; print a line each; 1 if any has a problem."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    failed = 0
    for result in gram_configs() + noise_configs():
        problems = result.problems
        failed += bool(problems)
        status = "FAIL " + "; ".join(problems) if problems else "ok"
        print(
            f"{result.kernel:>14} {result.config:<55} shared {result.shared:>7} B, "
            f"{result.registers:>3} registers: {status}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
