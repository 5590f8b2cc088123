"""Random perturbations on a sphere over a list of tensors, regenerated from a seed, never stored.

    z ~ N(0, I) over all tensors together (P elements),   θ_k ← θ_k + δ · z_k / ‖z‖

``sphere_perturb_`` applies it in place; ``sphere_noise`` returns ε = δ z/‖z‖ as new tensors.
Triton backend: z at global element index i (tensors in order, as if concatenated) is
``tl.randn(seed, i)`` (Philox), so the same (seed, tensors) always give the same ε and no P-sized
noise buffer is ever allocated: one kernel pass sums z² (partial sums per program, added in a
fixed order), a second regenerates z and adds δ z/‖z‖ in fp32. Torch backend (the plain-torch version of
the same math): z from a ``torch.Generator`` seeded with ``seed``, tensor by tensor. The two
backends draw different random streams; each is reproducible.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

Backend = Literal["auto", "triton", "torch"]
BLOCK = 1024
MAX_ELEMENTS = 2**31 - 2 * BLOCK  # Philox offsets are int32


def _check(tensors: list[torch.Tensor], radius: float) -> None:
    if isinstance(tensors, torch.Tensor) or not tensors:
        raise ValueError("tensors must be a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if not t.dtype.is_floating_point:
            raise TypeError(f"tensors[{i}] must be floating point, got {t.dtype}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError("all tensors must be on one device")
    if not (isinstance(radius, int | float) and radius >= 0 and radius != float("inf")):
        raise ValueError(f"radius must be a finite number ≥ 0, got {radius!r}")


def use_triton(device: torch.device, total: int, backend: Backend, what: str) -> bool:
    """Whether a kernel of ``what`` ("perturbation", "noise") over ``total`` elements on ``device``
    runs on Triton: ``"auto"`` on CUDA where triton is installed and the Philox offsets fit;
    ``"triton"`` is checked and refused with the reason where it cannot run; ``"torch"`` never."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return triton is not None and device.type == "cuda" and total <= MAX_ELEMENTS
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if total > MAX_ELEMENTS:
        raise ValueError(f"the Triton {what} handles at most {MAX_ELEMENTS} elements")
    return True


def _use_triton(tensors: list[torch.Tensor], backend: Backend) -> bool:
    if not use_triton(tensors[0].device, sum(t.numel() for t in tensors), backend, "perturbation"):
        return False
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"tensors[{i}] is not contiguous; the Triton backend writes it in place")
    return True


def sphere_noise_torch(tensors: list[torch.Tensor], seed: int, radius: float) -> list[torch.Tensor]:
    """ε = δ z/‖z‖ with z drawn tensor by tensor from ``torch.Generator().manual_seed(seed)``."""
    gen = torch.Generator(device=tensors[0].device).manual_seed(seed)
    noise = [torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in tensors]
    # at least float32 (half-precision tensors), float64 kept as it is
    norm = torch.stack(torch._foreach_norm(noise)).to(torch.promote_types(noise[0].dtype, torch.float32))
    norm = norm.square().sum().sqrt()
    return torch._foreach_mul(noise, radius / norm)


if triton is not None:

    @triton.jit
    def _sum_squares_kernel(partials_ptr, n, seed, offset, part_base, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        z = tl.randn(seed, offset + offs)
        z = tl.where(offs < n, z, 0.0)
        tl.store(partials_ptr + part_base + pid, tl.sum(z * z, axis=0))

    @triton.jit
    def _add_noise_kernel(x_ptr, n, seed, offset, scale_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.randn(seed, offset + offs)
        scale = tl.load(scale_ptr)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x + scale * z).to(x_ptr.dtype.element_ty), mask=mask)


def _triton_perturb_(tensors: list[torch.Tensor], seed: int, radius: float) -> None:
    device = tensors[0].device
    blocks = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    partials = torch.zeros(max(1, sum(blocks)), dtype=torch.float32, device=device)
    offset = part = 0
    for t, nb in zip(tensors, blocks):
        if nb:
            _sum_squares_kernel[(nb,)](partials, t.numel(), seed, offset, part, BLOCK=BLOCK)
        offset += t.numel()
        part += nb
    total = partials.sum()  # fixed order: deterministic
    scale = torch.where(total > 0, radius / total.sqrt(), torch.zeros_like(total)).reshape(1)
    offset = 0
    for t, nb in zip(tensors, blocks):
        if nb:
            _add_noise_kernel[(nb,)](t, t.numel(), seed, offset, scale, BLOCK=BLOCK)
        offset += t.numel()


@torch.no_grad()
def sphere_perturb_(tensors: list[torch.Tensor], seed: int, radius: float, *, backend: Backend = "auto") -> None:
    """In place: θ_k ← θ_k + δ z_k/‖z‖ (module docstring). ``backend="auto"``: Triton on CUDA."""
    _check(tensors, radius)
    if _use_triton(tensors, backend):
        _triton_perturb_(tensors, seed, radius)
    else:
        torch._foreach_add_(tensors, sphere_noise_torch(tensors, seed, radius))


@torch.no_grad()
def sphere_noise(
    tensors: list[torch.Tensor], seed: int, radius: float, *, backend: Backend = "auto"
) -> list[torch.Tensor]:
    """ε = δ z/‖z‖ shaped like ``tensors``, as new tensors (the same ε ``sphere_perturb_`` adds)."""
    _check(tensors, radius)
    if _use_triton(tensors, backend):
        noise = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in tensors]
        _triton_perturb_(noise, seed, radius)
        return noise
    return sphere_noise_torch(tensors, seed, radius)
