"""n samples of noise of a fixed norm per tensor, for a list of tensors, in a handful of launches.

For tensors of sizes s_1 … s_T (P elements together, laid out one after another as if
concatenated) and n samples, the result is one (n, P) tensor:

    z ~ N(0, I)  of shape (n, P),      ε_j,k = ν · z_j,k / ‖z_j,k‖

where z_j,k is sample j's slice of tensor k (a tensor with no elements gets none), so that every
tensor of every sample has norm exactly ν (up to rounding): the public COST code's perturbation,
there drawn by one ``torch.randn`` per tensor and sample. ``base`` (shape (P,)) is added to every
row when given, so that the result is the n perturbed points θ + ε_j themselves.

Backends (``backend="auto"``: Triton on CUDA where triton is installed, else torch):

- torch (``tensorwise_noise_torch``): z = ``torch.randn((n, P), generator=generator)``, the norms
  and scales as multi-tensor ops over the slices: five ops for all n samples.
- Triton (``tensorwise_noise_triton``): z at (j, i) is ``tl.randn(seed + j, i)`` (Philox), so z is
  never stored: one kernel sums z² over blocks that each lie inside one tensor, a second one
  regenerates z and writes base + ν z / ‖z_j,k‖, summing its tensor's partial sums in a fixed
  order (deterministic). Two launches for all n samples, the seed read from the device (an int
  or a one-element tensor; ``TensorwiseNoise`` draws it once from its generator). z and the
  noise are fp32 (the add to a float64 base is made in float64).

The two backends draw different random streams; each is reproducible from its generator state.
"""

from __future__ import annotations

import functools

import torch

from cost_fast.kernels.perturb import BLOCK, MAX_ELEMENTS, Backend, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

__all__ = [
    "BLOCK",
    "MAX_ELEMENTS",
    "TensorwiseNoise",
    "tensorwise_noise_torch",
    "tensorwise_noise_triton",
    "triton_noise_runs",
]


def _check(sizes: tuple[int, ...], samples: int, norm: float, base: torch.Tensor | None) -> None:
    if not sizes or any(not isinstance(s, int) or s < 0 for s in sizes):
        raise ValueError(f"sizes must be a non-empty tuple of element counts ≥ 0, got {sizes!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int ≥ 1, got {samples!r}")
    if not (isinstance(norm, int | float) and 0 <= norm < float("inf")):
        raise ValueError(f"norm must be a finite number ≥ 0, got {norm!r}")
    if base is not None and (base.ndim != 1 or base.numel() != sum(sizes)):
        raise ValueError(f"base must be a 1-D tensor of the {sum(sizes)} elements, got shape {tuple(base.shape)}")


def triton_noise_runs(device: torch.device, total: int) -> bool:
    """Whether ``backend="auto"`` runs the Triton kernel for ``total`` elements on ``device``."""
    return use_triton(device, total, "auto", "noise")


def tensorwise_noise_torch(
    sizes: tuple[int, ...],
    samples: int,
    norm: float,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """(samples, P): base + ε_j with ε_j,k = ν z_j,k / ‖z_j,k‖, z drawn as one
    ``torch.randn((samples, P), generator=generator)`` (module docstring)."""
    _check(sizes, samples, norm, base)
    z = torch.randn((samples, sum(sizes)), generator=generator, dtype=dtype, device=device)
    slices = [s for row in z for s in row.split(sizes) if s.numel()]
    if slices:
        scales = torch._foreach_reciprocal(torch._foreach_norm(slices))
        torch._foreach_mul_(scales, norm)
        torch._foreach_mul_(slices, scales)
    return z if base is None else z.add_(base)


if triton is not None:

    @triton.jit
    def _block_sums_kernel(partials_ptr, starts_ptr, ends_ptr, seed_ptr, num_blocks, BLOCK: tl.constexpr):
        # program (b, j): Σ z² over block b of sample j (a block never crosses a tensor's end);
        # the seed is read from the device, so that a CUDA graph replays with the current one
        b = tl.program_id(0)
        j = tl.program_id(1)
        seed = tl.load(seed_ptr)
        offs = tl.load(starts_ptr + b) + tl.arange(0, BLOCK)
        z = tl.randn(seed + j, offs)
        z = tl.where(offs < tl.load(ends_ptr + b), z, 0.0)
        tl.store(partials_ptr + j * num_blocks + b, tl.sum(z * z, axis=0))

    @triton.jit
    def _write_noise_kernel(
        out_ptr,
        base_ptr,
        partials_ptr,
        starts_ptr,
        ends_ptr,
        first_ptr,
        count_ptr,
        seed_ptr,
        norm,
        num_blocks,
        total,
        HAS_BASE: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # program (b, j): its tensor's ‖z‖ from the tensor's block sums (fixed order), then
        # out[j, block] = base + norm · z / ‖z‖ with z regenerated
        b = tl.program_id(0)
        j = tl.program_id(1)
        seed = tl.load(seed_ptr)
        first = tl.load(first_ptr + b)
        count = tl.load(count_ptr + b)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, count, BLOCK):
            idx = c + tl.arange(0, BLOCK)
            acc += tl.load(partials_ptr + j * num_blocks + first + idx, mask=idx < count, other=0.0)
        sq = tl.sum(acc, axis=0)
        scale = tl.where(sq > 0, norm / tl.sqrt(sq), 0.0)
        offs = tl.load(starts_ptr + b) + tl.arange(0, BLOCK)
        mask = offs < tl.load(ends_ptr + b)
        value = scale * tl.randn(seed + j, offs)
        if HAS_BASE:  # the add in float64 for a float64 base (θ keeps its precision), else in fp32
            base = tl.load(base_ptr + offs, mask=mask, other=0.0)
            if WIDE:
                value = base.to(tl.float64) + value.to(tl.float64)
            else:
                value = base.to(tl.float32) + value
        tl.store(out_ptr + j * total + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _block_table(sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per block: start and end (of its tensor) in the flat index, its tensor's first block and
    block count; blocks cover each tensor from its start, none crosses into the next."""
    starts, ends, firsts, counts = [], [], [], []
    offset = 0
    for s in sizes:
        first, nb = len(starts), -(-s // BLOCK)
        for k in range(nb):
            starts.append(offset + k * BLOCK)
            ends.append(offset + s)
            firsts.append(first)
            counts.append(nb)
        offset += s
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (starts, ends, firsts, counts))


def tensorwise_noise_triton(
    sizes: tuple[int, ...],
    samples: int,
    norm: float,
    *,
    seed: int | torch.Tensor,
    dtype: torch.dtype,
    device: torch.device | str,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """(samples, P): base + ε_j with z at (j, i) = Philox ``tl.randn(seed + j, i)`` (module
    docstring), in two launches. ``seed``: an int, or a one-element int64 tensor on the device
    (read by the kernels, never by the host)."""
    _check(sizes, samples, norm, base)
    device = torch.device(device)
    total = sum(sizes)
    use_triton(device, total, "triton", "noise")
    out = torch.empty((samples, total), dtype=dtype, device=device)
    starts, ends, firsts, counts = _block_table(tuple(sizes), device)
    num_blocks = starts.numel()
    if num_blocks == 0:
        return out
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64, device=device)
    partials = torch.empty((samples, num_blocks), dtype=torch.float32, device=device)
    grid = (num_blocks, samples)
    _block_sums_kernel[grid](partials, starts, ends, seed, num_blocks, BLOCK=BLOCK)
    _write_noise_kernel[grid](
        out,
        base if base is not None else out,
        partials,
        starts,
        ends,
        firsts,
        counts,
        seed,
        float(norm),
        num_blocks,
        total,
        HAS_BASE=base is not None,
        WIDE=dtype == torch.float64,
        BLOCK=BLOCK,
    )
    return out


class TensorwiseNoise:
    """Draws of n samples of tensorwise noise for tensors of ``sizes`` (module docstring), one
    (n, P) tensor per ``draw``.

    The torch backend draws z from ``generator`` at every draw. The Triton backend draws one
    seed from ``generator`` when it is built (one host read) and keeps it on the device: draw d
    uses seed + d·n + j for sample j, the kernels read it and one add moves it on, so no draw
    reads the device and a CUDA graph of a draw replays with fresh noise. ``backend="auto"``:
    Triton on CUDA where triton is installed, else torch.
    """

    def __init__(
        self,
        sizes: tuple[int, ...],
        samples: int,
        norm: float,
        *,
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: Backend = "auto",
    ) -> None:
        _check(tuple(sizes), samples, norm, None)
        self.sizes, self.samples, self.norm = tuple(sizes), samples, norm
        self.generator, self.dtype, self.device = generator, dtype, torch.device(device)
        self.triton = use_triton(self.device, sum(self.sizes), backend, "noise")
        self.seed: torch.Tensor | None = None  # the next draw's seed, on the device (Triton)
        if self.triton:
            seed_device = generator.device if generator is not None else "cpu"
            seed = torch.randint(0, 2**62, (1,), generator=generator, device=seed_device, dtype=torch.int64)
            self.seed = seed.to(self.device)

    def draw(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """(n, P): base + ε_j for the next n samples."""
        if not self.triton:
            return tensorwise_noise_torch(
                self.sizes,
                self.samples,
                self.norm,
                generator=self.generator,
                dtype=self.dtype,
                device=self.device,
                base=base,
            )
        out = tensorwise_noise_triton(
            self.sizes, self.samples, self.norm, seed=self.seed, dtype=self.dtype, device=self.device, base=base
        )
        self.seed.add_(self.samples)
        return out
