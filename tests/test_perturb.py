"""Sphere perturbations: both backends (Triton through TRITON_INTERPRET=1 on CPU), awkward sizes,
regenerability, exact radius, global indexing, dtypes, NaN, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from cost_fast.kernels.perturb import BLOCK, sphere_noise, sphere_perturb_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
SHAPES = [(), (1,), (127,), (BLOCK,), (BLOCK + 1,), (33, 65), (0,), (3, 0, 2)]


def tensors(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in SHAPES]


def flat(ts):
    return torch.cat([t.reshape(-1).float() for t in ts])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("radius", [0.0, 1e-3, 2.5])
def test_perturbation_has_the_radius_and_is_regenerable(backend: str, radius: float) -> None:
    base = tensors()
    a = [t.clone() for t in base]
    sphere_perturb_(a, seed=7, radius=radius, backend=backend)
    moved = flat(a) - flat(base)
    torch.testing.assert_close(moved.norm(), torch.tensor(radius, device=DEVICE), rtol=1e-4, atol=1e-6)
    b = [t.clone() for t in base]
    sphere_perturb_(b, seed=7, radius=radius, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    eps = sphere_noise(base, seed=7, radius=radius, backend=backend)
    torch.testing.assert_close(flat(eps), moved, rtol=1e-5, atol=1e-6)  # the same ε, out of place
    assert [e.shape for e in eps] == [t.shape for t in base]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_differ_and_noise_looks_gaussian(backend: str) -> None:
    big = [torch.zeros(60_000, device=DEVICE), torch.zeros(40_001, device=DEVICE)]
    z1 = flat(sphere_noise(big, seed=1, radius=1.0, backend=backend)) * math.sqrt(100_001)
    z2 = flat(sphere_noise(big, seed=2, radius=1.0, backend=backend)) * math.sqrt(100_001)
    assert not torch.equal(z1, z2)
    assert abs(z1.mean().item()) < 0.02 and abs(z1.std().item() - 1.0) < 0.02  # unit-norm rescaled z
    assert abs(torch.corrcoef(torch.stack([z1, z2]))[0, 1].item()) < 0.02


def test_triton_noise_is_indexed_globally() -> None:
    """Perturbing [a, b] equals perturbing their concatenation: z depends on the global index."""
    a, b = torch.zeros(3000, device=DEVICE), torch.zeros(1500, device=DEVICE)
    split = flat(sphere_noise([a, b], seed=5, radius=1.0, backend="triton"))
    whole = sphere_noise([torch.zeros(4500, device=DEVICE)], seed=5, radius=1.0, backend="triton")[0]
    torch.testing.assert_close(split, whole)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_tensors(backend: str, dtype: torch.dtype) -> None:
    base = tensors(dtype)
    a = [t.clone() for t in base]
    sphere_perturb_(a, seed=3, radius=4.0, backend=backend)
    assert all(t.dtype == dtype for t in a)
    # |‖θ' - θ‖ - δ| stems from rounding θ + ε to the dtype; measured worst over 10 seeds, both
    # backends: 7e-4 (fp16), 1.0e-2 (bf16), 1e-6 (fp32)
    tol = {torch.float16: 3e-3, torch.bfloat16: 4e-2, torch.float32: 1e-5}[dtype]
    assert abs((flat(a) - flat(base)).norm().item() - 4.0) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_where_it_was(backend: str) -> None:
    t = [torch.tensor([1.0, float("nan"), 3.0], device=DEVICE)]
    sphere_perturb_(t, seed=0, radius=0.1, backend=backend)
    assert torch.isnan(t[0][1]) and torch.isfinite(t[0][[0, 2]]).all()


def test_bad_input() -> None:
    x = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="non-empty list"):
        sphere_perturb_([], seed=0, radius=1.0)
    with pytest.raises(ValueError, match="non-empty list"):
        sphere_perturb_(x, seed=0, radius=1.0)
    with pytest.raises(ValueError, match="radius"):
        sphere_perturb_([x], seed=0, radius=-1.0)
    with pytest.raises(TypeError, match="floating point"):
        sphere_perturb_([torch.zeros(3, dtype=torch.int64)], seed=0, radius=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        sphere_perturb_([torch.zeros(4, 4, device=DEVICE).T], seed=0, radius=1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sphere_perturb_([x], seed=0, radius=1.0, backend="numpy")
