"""Each aggregator against its defining property (not a copy of its code), and on degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cost_fast.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    ConicGrad,
    DualProj,
    FairGrad,
    GradDrop,
    GradVac,
    Mean,
    MoCo,
    NashMTL,
    PCGrad,
    Sum,
    UPGrad,
)
from cost_fast.aggregators.aligned import aligning_matrix
from cost_fast.methods import get_aggregator, list_aggregators

GRAM_METHODS = sorted(name for name, kind in list_aggregators().items() if kind == "gram")
SEEDS = [0, 1, 2]
KS = [2, 3, 7, 16, 40]


def conflicting_grads(K: int, P: int = 60, seed: int = 0) -> torch.Tensor:
    """Float64 task gradients with a common part, some tasks flipped (conflicts), norms over a decade."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=torch.float64) + 0.4 * torch.randn(
        1, P, generator=gen, dtype=torch.float64
    )
    G[: K // 3] *= -0.6
    return G * torch.logspace(-0.5, 0.5, K, dtype=torch.float64)[:, None]


def gram_and_weights(method, K: int, seed: int):
    G = conflicting_grads(K, seed=seed)
    M = G @ G.T
    w = method.weights(M).double()
    return G, M, w


def test_registry_lists_every_method_with_its_kind() -> None:
    names = list_aggregators()
    for name in (
        "mean",
        "sum",
        "mgda",
        "cagrad",
        "imtl_g",
        "nash_mtl",
        "fairgrad",
        "aligned_mtl",
        "upgrad",
        "dualproj",
        "config",
        "pcgrad",
    ):
        assert names[name] == "gram"
    assert isinstance(get_aggregator("fairgrad", alpha=2.0), FairGrad)
    assert get_aggregator("fairgrad", alpha=2.0).alpha == 2.0
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        get_aggregator("nope")
    with pytest.raises(TypeError):
        get_aggregator("mean", alpha=1.0)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: FairGrad(alpha=0), "alpha"),
        (lambda: FairGrad(alpha=-1.0), "alpha"),
        (lambda: FairGrad(alpha=float("nan")), "alpha"),
        (lambda: CAGrad(c=-0.1), "c must"),
        (lambda: CAGrad(rescale=3), "rescale"),
        (lambda: ConicGrad(c=1.0), "c must"),
        (lambda: ConicGrad(c=-0.2), "c must"),
    ],
)
def test_bad_hyperparameters(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_linear_scalarization() -> None:
    M = conflicting_grads(4) @ conflicting_grads(4).T
    torch.testing.assert_close(Mean()(M), torch.full((4,), 0.25, dtype=torch.float64))
    assert Mean()(M.float()).dtype == torch.float32
    torch.testing.assert_close(Sum()(M), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", KS)
def test_mgda_satisfies_kkt(K: int, seed: int) -> None:
    _, M, w = gram_and_weights(MGDA(), K, seed)
    assert (w >= 0).all() and abs(w.sum().item() - 1) < 1e-6
    g = M @ w
    value = w @ g  # min-norm value ‖d‖²
    scale = M.diagonal().max()
    # KKT of min wᵀMw on the simplex: (Mw)_j ≥ wᵀMw for all j, equality where w_j > 0
    assert (g >= value - 1e-5 * scale).all()
    assert ((g - value).abs()[w > 1e-6] <= 1e-5 * scale).all()


def test_mgda_two_tasks_closed_form() -> None:
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, 1.0], dtype=torch.float64)
    G = torch.stack([g1, g2])
    gamma = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)  # weight of g1
    torch.testing.assert_close(MGDA()(G @ G.T).double(), torch.stack([gamma, 1 - gamma]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("K", KS)
def test_fairgrad_fixed_point(K: int, alpha: float) -> None:
    _, M, w = gram_and_weights(FairGrad(alpha=alpha), K, seed=K)
    assert (w > 0).all()
    target = w ** (-1 / alpha)
    assert ((M @ w - target).abs() / target).max() < 1e-5


@pytest.mark.parametrize("K", KS)
def test_nash_mtl_fixed_point_and_equals_fairgrad_alpha_1(K: int) -> None:
    _, M, w = gram_and_weights(NashMTL(), K, seed=K)
    assert ((M @ w - 1 / w).abs() * w).max() < 1e-5
    torch.testing.assert_close(NashMTL()(M), FairGrad(alpha=1.0)(M))


def cagrad_scipy(M: np.ndarray, c: float) -> float:
    """The dual objective's minimum by SLSQP from several starts (the paper code's solver)."""
    K = M.shape[0]
    b = M.sum(1) / K
    sqrt_phi = c * np.sqrt(M.sum() / K**2)

    def f(w):
        return w @ b + sqrt_phi * np.sqrt(max(w @ M @ w, 1e-300))

    best = np.inf
    for start in [np.full(K, 1 / K), *np.eye(K)[:3]]:
        res = minimize(
            f,
            start,
            bounds=[(0, 1)] * K,
            method="SLSQP",
            constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
            options={"ftol": 1e-12, "maxiter": 500},
        )
        best = min(best, f(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()))
    return best


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("K", [2, 3, 7, 16])
def test_cagrad_ball_and_optimality(K: int, c: float) -> None:
    G, M, w = gram_and_weights(CAGrad(c=c, rescale=0), K, seed=K)
    d, g0 = G.T @ w, G.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-5)  # inside the ball
    # the dual weights reach SLSQP's optimum of the dual objective (or better)
    from cost_fast.aggregators.cagrad import cagrad_dual_weights

    wd = cagrad_dual_weights(M, c)
    b, sqrt_phi = M.sum(1) / K, c * (M.sum() / K**2).sqrt()
    ours = (wd @ b + sqrt_phi * (wd @ M @ wd).sqrt()).item()
    assert ours <= cagrad_scipy(M.numpy(), c) + 1e-7 * abs(ours) + 1e-12
    # primal: d maximizes the worst improvement min_i g_iᵀd over the ball; check against
    # random feasible points on the ball's boundary
    worst = (G @ d).min()
    gen = torch.Generator().manual_seed(0)
    dirs = torch.randn(2000, G.shape[1], generator=gen, dtype=torch.float64)
    others = g0 + c * g0.norm() * dirs / dirs.norm(dim=1, keepdim=True)
    assert worst >= (others @ G.T).min(dim=1).values.max() - 1e-6 * g0.norm() ** 2


@pytest.mark.parametrize("c", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("K", [2, 3, 7, 16])
def test_conicgrad_stays_in_its_cone_and_is_max_min_optimal(K: int, c: float) -> None:
    G, M, w = gram_and_weights(ConicGrad(c=c), K, seed=K)
    d, g0 = G.T @ w, G.mean(0)
    cos = d @ g0 / (d.norm() * g0.norm())
    assert cos >= c - 1e-6  # inside the cone
    torch.testing.assert_close(d.norm(), g0.norm(), rtol=1e-5, atol=0)
    # no direction of the cone improves the worst task more (sampled cone directions)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4000, G.shape[1], generator=gen, dtype=torch.float64)
    g0_hat = g0 / g0.norm()
    u = u - (u @ g0_hat)[:, None] * g0_hat
    u = u / u.norm(dim=1, keepdim=True)
    t = torch.rand(4000, 1, generator=gen, dtype=torch.float64)
    cos_t = c + (1 - c) * t  # cosines in [c, 1]
    dirs = cos_t * g0_hat + (1 - cos_t**2).sqrt() * u
    best_sampled = (dirs @ G.T).min(dim=1).values.max()
    assert (G @ d).min() / d.norm() >= best_sampled - 1e-6 * G.norm(dim=1).max()


def test_cagrad_rescale_and_c_zero() -> None:
    _, M, _ = gram_and_weights(Mean(), 5, 0)
    base = CAGrad(c=0.5, rescale=0)(M)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=1)(M), base / 1.25)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=2)(M), base / 1.5)
    torch.testing.assert_close(CAGrad(c=0.0)(M), Mean()(M))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", KS)
def test_imtl_g_equal_projections(K: int, seed: int) -> None:
    G, M, w = gram_and_weights(IMTLG(), K, seed)
    if K > G.shape[1]:
        pytest.skip("needs linearly independent gradients")
    d = G.T @ w
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    assert abs(w.sum().item() - 1) < 1e-5
    assert (proj - proj.mean()).abs().max() <= 1e-4 * proj.abs().max()


@pytest.mark.parametrize("K", KS)
def test_aligned_mtl_condition_number_one(K: int) -> None:
    G, M, w = gram_and_weights(AlignedMTL(), K, seed=K)
    B = aligning_matrix(M)
    aligned = B @ M @ B.T
    eig = torch.linalg.eigvalsh(aligned)
    assert eig.max() / eig.min() < 1 + 1e-6
    torch.testing.assert_close(w, B @ torch.full((K,), 1.0 / K, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_aligned_mtl_rank_deficient_is_conditioned_on_span() -> None:
    G = conflicting_grads(3, P=2)  # 3 gradients in R²: rank 2
    M = G @ G.T
    eig = torch.linalg.eigvalsh(aligning_matrix(M) @ M @ aligning_matrix(M))
    nonzero = eig[eig > 1e-9 * eig.max()]
    assert len(nonzero) == 2 and nonzero.max() / nonzero.min() < 1 + 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", KS)
def test_pcgrad_leaves_no_conflict_with_last_projected_task(K: int, seed: int) -> None:
    G = conflicting_grads(K, seed=seed)
    M = G @ G.T
    C, order = PCGrad(seed=seed).projection_coefficients(M)
    projected = C @ G
    for i in range(K):
        partners = [j for j in order[i].tolist() if j != i]
        last = partners[-1]
        # the last projection is not undone by a later one
        assert projected[i] @ G[last] >= -1e-9 * G[i].norm() * G[last].norm()


def test_pcgrad_two_tasks_closed_form() -> None:
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    G = torch.stack([g1, g2])
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    torch.testing.assert_close(PCGrad().aggregate(G.float()).double(), p1 + p2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [PCGrad, GradVac])
def test_state_dict_resumes_random_orders_and_targets(cls) -> None:
    M = conflicting_grads(5) @ conflicting_grads(5).T
    a = cls(seed=3)
    a(M)
    state = a.state_dict()
    expected = a(M)
    b = cls(seed=99)
    b.load_state_dict(state)
    torch.testing.assert_close(b(M), expected)


@pytest.mark.parametrize("method", [UPGrad(), DualProj()], ids=["upgrad", "dualproj"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", KS)
def test_dual_cone_update_conflicts_with_no_task(method, K: int, seed: int) -> None:
    G, M, w = gram_and_weights(method, K, seed)
    d = G.T @ w
    assert ((G @ d) >= -1e-5 * G.norm(dim=1) * d.norm()).all()


def test_dual_cone_methods_keep_a_conflict_free_mean() -> None:
    G = torch.tensor([[1.0, 0.2], [0.8, 1.0], [0.5, 0.5]], dtype=torch.float64)  # no conflict
    M = G @ G.T
    torch.testing.assert_close(DualProj()(M), Mean()(M))
    torch.testing.assert_close(UPGrad()(M), Mean()(M))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("K", [2, 3, 7, 16, 40])
def test_config_equal_positive_projections(K: int, seed: int) -> None:
    G, M, w = gram_and_weights(ConFIG(), K, seed)
    d = G.T @ w
    proj = (G / G.norm(dim=1, keepdim=True)) @ d
    assert (proj > 0).all()
    assert (proj - proj.mean()).abs().max() <= 1e-4 * proj.abs().max()
    # magnitude: d = s·v̂ with s = Σ_i g_iᵀv̂, hence ‖d‖² = Σ_i g_iᵀd
    torch.testing.assert_close(d @ d, (G @ d).sum(), rtol=1e-5, atol=0)


def degenerate_grams() -> dict[str, torch.Tensor]:
    g = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rank2 = conflicting_grads(5, P=2)
    with_zero = conflicting_grads(4)
    with_zero[2] = 0
    spread = conflicting_grads(5) * torch.logspace(-8, 8, 5, dtype=torch.float64)[:, None]
    cases = {
        "all_zero": torch.zeros(3, 50, dtype=torch.float64),
        "one_zero": with_zero,
        "identical": g.repeat(4, 1),
        "opposite": torch.stack([g, -g]),
        "single_task": g[None],
        "rank_deficient": rank2,
        "norms_1e-8_to_1e8": spread,
    }
    return {name: G @ G.T for name, G in cases.items()}


@pytest.mark.parametrize("case", list(degenerate_grams()))
@pytest.mark.parametrize("name", GRAM_METHODS)
def test_degenerate_input_gives_finite_weights(name: str, case: str) -> None:
    M = degenerate_grams()[case]
    w = get_aggregator(name)(M)
    assert w.shape == (M.shape[0],) and w.dtype == M.dtype
    assert torch.isfinite(w).all(), f"{name} on {case}: {w}"


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_single_task_moves_along_its_gradient(name: str) -> None:
    G = torch.randn(1, 30, dtype=torch.float64)
    w = get_aggregator(name)(G @ G.T)
    assert w.item() > 0


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_bad_gram_is_named(name: str) -> None:
    method = get_aggregator(name)
    with pytest.raises(ValueError, match="square"):
        method(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        method(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        method([[1.0]])
    with pytest.raises(ValueError, match="0 x 0"):
        method(torch.zeros(0, 0))


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_aggregate_is_weighted_sum_of_rows(name: str) -> None:
    G = conflicting_grads(5).float()
    # two fresh instances: random draws (same seed) and carried state both start alike
    a, b = get_aggregator(name), get_aggregator(name)
    d = a.aggregate(G)
    torch.testing.assert_close(d, G.T @ b.weights(G.double() @ G.double().T).float(), rtol=1e-4, atol=1e-5)


def test_gradvac_first_step_is_pcgrad_and_targets_follow_ema() -> None:
    M = conflicting_grads(6) @ conflicting_grads(6).T
    vac = GradVac(beta=0.2, seed=5)
    torch.testing.assert_close(vac(M), PCGrad(seed=5)(M))  # targets start at 0
    # after one step each off-diagonal target is 0.2 · (a cosine), the diagonal stays 0
    off = ~torch.eye(6, dtype=torch.bool)
    assert (vac.targets[off] != 0).all() and (vac.targets[off].abs() <= 0.2 + 1e-12).all()
    assert (vac.targets.diagonal() == 0).all()


@pytest.mark.parametrize("K", [2, 3, 7, 16])
def test_gradvac_reaches_target_with_last_partner(K: int) -> None:
    G = conflicting_grads(K, seed=K)
    M = G @ G.T
    vac = GradVac(beta=0.5, seed=K)
    for _ in range(3):  # let the targets move away from 0
        vac(M)
    C, order, used = vac.vaccinate(M)
    adjusted = C @ G
    for i in range(K):
        last = [j for j in order[i].tolist() if j != i][-1]
        cos = adjusted[i] @ G[last] / (adjusted[i].norm() * G[last].norm())
        assert cos >= used[i, last] - 1e-6


def test_gradvac_task_count_is_fixed() -> None:
    M = conflicting_grads(5) @ conflicting_grads(5).T
    a = GradVac(seed=1)
    a(M)
    with pytest.raises(ValueError, match="K = 5 tasks, now K = 3"):
        a(M[:3, :3])


def test_graddrop_keeps_one_sign_per_coordinate() -> None:
    G = conflicting_grads(5, P=400).float()
    G[:, 0] = torch.tensor([1.0, 2.0, 0.5, 0.1, 3.0])  # all positive: purity 1, always kept
    d = GradDrop(seed=0).aggregate(G)
    positive = (G * (G > 0)).sum(0)
    negative = (G * (G < 0)).sum(0)
    assert torch.isclose(d, positive).logical_or(torch.isclose(d, negative)).all()
    assert d[0] == G[:, 0].sum()
    assert torch.isclose(d, positive).any() and torch.isclose(d, negative).any()
    torch.testing.assert_close(GradDrop(seed=3).aggregate(G), GradDrop(seed=3).aggregate(G))
    with pytest.raises(TypeError, match="aggregate"):
        GradDrop().weights(G @ G.T)


def test_graddrop_state_dict_resumes_randomness() -> None:
    G = conflicting_grads(4, P=300).float()
    a = GradDrop(seed=2)
    a.aggregate(G)
    state = a.state_dict()
    expected = a.aggregate(G)
    b = GradDrop(seed=9)
    b.load_state_dict(state)
    torch.testing.assert_close(b.aggregate(G), expected)


def test_moco_converges_to_min_norm_point_on_fixed_gradients() -> None:
    G = conflicting_grads(4).float()
    moco = MoCo(beta=0.5, gamma=0.5)
    for _ in range(3000):
        d = moco.aggregate(G)
    w_mgda = MGDA()(G.double() @ G.double().T).float()
    torch.testing.assert_close(d, G.T @ w_mgda, rtol=1e-3, atol=1e-4)
    with pytest.raises(TypeError, match="aggregate"):
        moco(G @ G.T)
    with pytest.raises(ValueError, match="tracks gradients"):
        moco.aggregate(G[:3])


def test_moco_tracks_and_resumes() -> None:
    G1, G2 = conflicting_grads(3, seed=1).float(), conflicting_grads(3, seed=2).float()
    moco = MoCo(beta=0.25)
    moco.aggregate(G1)
    moco.aggregate(G2)
    torch.testing.assert_close(moco.tracked, 0.75 * G1 + 0.25 * G2)
    state = moco.state_dict()
    expected = moco.aggregate(G1)
    other = MoCo(beta=0.25)
    other.load_state_dict(state)
    torch.testing.assert_close(other.aggregate(G1), expected)
