"""Tensorwise noise (the public semantics' flat draw): both backends (Triton through
TRITON_INTERPRET=1 on CPU), what the public code relies on (each tensor's noise has exactly the
radius as its norm, samples independent, mean zero, the same stream from the same seed), awkward
sizes, dtypes, the base added, bad input."""

from __future__ import annotations

import pytest
import torch

from cost_fast.kernels.tensorwise_noise import (
    BLOCK,
    TensorwiseNoise,
    tensorwise_noise_torch,
    tensorwise_noise_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]
SIZES = (1, 127, BLOCK, BLOCK + 1, 0, 33 * 65, 5)


def drawer(backend: str, samples: int = 4, norm: float = 0.5, seed: int = 0, sizes=SIZES, dtype=torch.float32):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return TensorwiseNoise(sizes, samples, norm, generator=generator, dtype=dtype, device=DEVICE, backend=backend)


def norms(noise: torch.Tensor, sizes=SIZES) -> torch.Tensor:
    """(n, T) the norm of every tensor's slice of every sample."""
    return torch.stack([torch.stack([s.double().norm() for s in row.split(sizes)]) for row in noise])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [0.0, 1e-4, 2.5])
def test_every_tensor_of_every_sample_has_the_norm(backend: str, norm: float) -> None:
    noise = drawer(backend, norm=norm).draw()
    assert noise.shape == (4, sum(SIZES)) and noise.dtype == torch.float32
    expected = torch.tensor([0.0 if s == 0 else norm for s in SIZES], dtype=torch.float64).expand(4, -1)
    torch.testing.assert_close(norms(noise).cpu(), expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_seed_gives_the_same_stream_and_draws_move_on(backend: str) -> None:
    a, b = drawer(backend, seed=3), drawer(backend, seed=3)
    first = a.draw()
    assert torch.equal(first, b.draw())
    second = a.draw()
    assert not torch.equal(first, second)  # the next draw is new noise
    assert torch.equal(second, b.draw())
    assert not torch.equal(drawer(backend, seed=4).draw(), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_are_independent_with_mean_zero(backend: str) -> None:
    sizes = (60_000, 40_001)
    noise = drawer(backend, samples=3, norm=1.0, sizes=sizes).draw()
    # each tensor rescaled back to unit-variance z
    z = torch.cat([part * part.shape[1] ** 0.5 for part in noise.split(sizes, dim=1)], dim=1).double()
    assert z.mean(dim=1).abs().max() < 0.02 and (z.std(dim=1) - 1).abs().max() < 0.02
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(3, dtype=torch.float64)).abs().max() < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_the_base_is_added_in_every_dtype(backend: str, dtype: torch.dtype) -> None:
    base = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    noise = drawer(backend, dtype=dtype).draw()
    points = drawer(backend, dtype=dtype).draw(base)
    assert points.dtype == dtype and noise.dtype == dtype
    # rounding of base + ε to the dtype (both computed in at least fp32 before the store)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(points.double(), (base.double() + noise.double()).expand_as(points), rtol=tol, atol=tol)


def test_the_torch_backend_draws_z_from_the_generator_as_one_randn() -> None:
    generator = torch.Generator().manual_seed(5)
    noise = tensorwise_noise_torch(SIZES, 3, 0.1, generator=generator, dtype=torch.float64, device="cpu")
    z = torch.randn((3, sum(SIZES)), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for row, zrow in zip(noise, z):
        for part, zpart in zip(row.split(SIZES), zrow.split(SIZES)):
            if zpart.numel():
                torch.testing.assert_close(part, 0.1 * zpart / zpart.norm(), rtol=1e-14, atol=0)


def test_the_triton_backend_reads_its_seed_once() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = TensorwiseNoise(SIZES, 2, 1.0, generator=generator, dtype=torch.float32, device="cpu", backend="triton")
    state = generator.get_state()
    noise.draw()
    noise.draw()
    assert torch.equal(generator.get_state(), state)  # the draws use the seed taken when it was built


def test_the_triton_draws_follow_the_seed_on_the_device() -> None:
    """Draw d of a drawer whose device seed is s is the kernel's noise at seed s + d·n: the seed
    lives on the device and one add moves it on (what a CUDA graph of a draw replays)."""
    noise = drawer("triton", samples=3)
    start = int(noise.seed)
    first, second = noise.draw(), noise.draw()
    for d, drawn in enumerate((first, second)):
        expected = tensorwise_noise_triton(SIZES, 3, 0.5, seed=start + 3 * d, dtype=torch.float32, device=DEVICE)
        assert torch.equal(drawn, expected)
    assert int(noise.seed) == start + 6


def test_bad_input_is_refused() -> None:
    gen = torch.Generator()
    kwargs = dict(generator=gen, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="sizes"):
        TensorwiseNoise((), 2, 1.0, **kwargs)
    with pytest.raises(ValueError, match="sizes"):
        TensorwiseNoise((3, -1), 2, 1.0, **kwargs)
    with pytest.raises(ValueError, match="samples"):
        TensorwiseNoise((3,), 0, 1.0, **kwargs)
    with pytest.raises(ValueError, match="norm"):
        TensorwiseNoise((3,), 2, float("inf"), **kwargs)
    with pytest.raises(ValueError, match="backend"):
        TensorwiseNoise((3,), 2, 1.0, backend="cuda", **kwargs)
    with pytest.raises(ValueError, match="base"):
        TensorwiseNoise((3,), 2, 1.0, **kwargs).draw(torch.zeros(4))
