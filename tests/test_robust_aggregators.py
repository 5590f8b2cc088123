"""Constant, Random, Krum and the trimmed mean: each one's defining property."""

from __future__ import annotations

import pytest
import torch

from cost_fast import get_aggregator


def honest_and_corrupted(K: int, f: int, P: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K - f honest gradients near a common direction, then f arbitrary (huge) ones."""
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(P, generator=gen, dtype=torch.float64)
    honest = center + 0.1 * torch.randn(K - f, P, generator=gen, dtype=torch.float64)
    corrupted = 1e3 * torch.randn(f, P, generator=gen, dtype=torch.float64)
    return torch.cat([honest, corrupted]), honest


@pytest.mark.parametrize(("K", "f", "m"), [(7, 2, 1), (9, 3, 2), (5, 1, 3)])
def test_krum_selects_honest_gradients_only(K: int, f: int, m: int) -> None:
    G, honest = honest_and_corrupted(K, f)
    w = get_aggregator("krum", n_byzantine=f, n_selected=m).weights(G @ G.T)
    chosen = torch.nonzero(w).flatten()
    assert len(chosen) == m and bool((chosen < K - f).all())  # no corrupted row
    torch.testing.assert_close(w[chosen], torch.full((m,), 1.0 / m, dtype=torch.float64))
    # its score: the chosen row is the one closest to its K - f - 2 nearest others
    distances = torch.cdist(G, G).square()
    distances.fill_diagonal_(float("inf"))
    scores = torch.topk(distances, K - f - 2, dim=1, largest=False).values.sum(1)
    assert set(chosen.tolist()) == set(torch.topk(scores, m, largest=False).indices.tolist())
    with pytest.raises(ValueError, match="2f \\+ 3"):
        get_aggregator("krum", n_byzantine=f, n_selected=m).weights((G @ G.T)[: 2 * f + 2, : 2 * f + 2])


@pytest.mark.parametrize("t", [1, 2])
def test_trimmed_mean_is_robust_to_t_arbitrary_rows(t: int) -> None:
    G, honest = honest_and_corrupted(2 * t + 3, t)
    d = get_aggregator("trimmed_mean", trim_number=t).aggregate(G)
    ordered = torch.sort(G, dim=0).values
    torch.testing.assert_close(d, ordered[t : G.shape[0] - t].mean(0))  # the definition
    low, high = honest.min(0).values, honest.max(0).values
    assert bool(((d >= low - 1e-12) & (d <= high + 1e-12)).all())  # within the honest range
    with pytest.raises(ValueError, match="more than"):
        get_aggregator("trimmed_mean", trim_number=t).aggregate(G[: 2 * t])


def test_constant_and_random_weights() -> None:
    G, _ = honest_and_corrupted(4, 0)
    M = G @ G.T
    constant = get_aggregator("constant", weights=[0.5, 0.0, 2.0, 1.0])
    torch.testing.assert_close(constant.weights(M), torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(get_aggregator("constant").weights(M), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 tasks"):
        get_aggregator("constant", weights=[1.0, 2.0]).weights(M)
    rand = get_aggregator("random", seed=3)
    first, second = rand.weights(M), rand.weights(M)
    for w in (first, second):  # on the simplex
        assert bool((w > 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    assert not torch.equal(first, second)  # fresh weights at every call
    state = rand.state_dict()
    again = get_aggregator("random", seed=99)
    again.load_state_dict(state)
    torch.testing.assert_close(again.weights(M), rand.weights(M))  # the state round-trips
