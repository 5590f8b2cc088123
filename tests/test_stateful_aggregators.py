"""PCD, MoDo, SDMGrad, CR-MOGM and ExcessMTL: each one's defining property, written from its
paper's equations (scipy solves the problems; nothing is shared with the methods' solvers), and
a state that round-trips: a method restored from ``state_dict`` continues exactly as the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cost_fast import get_aggregator
from cost_fast.aggregators.solvers import nonnegative_qp, nonnegative_qp_active_set


def gradients(K: int, P: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        1, P, generator=gen, dtype=torch.float64
    )
    G[1] = -0.8 * G[0] + 0.3 * G[1]  # a secondary task in conflict with the primary one
    return G


def simplex_projection(v: np.ndarray) -> np.ndarray:
    """argmin_{w ≥ 0, Σw = 1} ‖w − v‖², by scipy."""
    K = len(v)
    return minimize(
        lambda w: 0.5 * np.sum((w - v) ** 2),
        np.full(K, 1 / K),
        jac=lambda w: w - v,
        bounds=[(0, None)] * K,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    ).x


def min_norm_weights(M: np.ndarray) -> np.ndarray:
    """MGDA's weights argmin_{w ∈ simplex} wᵀMw, by scipy."""
    K = len(M)
    return minimize(
        lambda w: w @ M @ w,
        np.full(K, 1 / K),
        jac=lambda w: 2 * M @ w,
        bounds=[(0, None)] * K,
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    ).x


def assert_resumes(name: str, inputs: list[torch.Tensor], **hparams) -> None:
    """Run ``name`` on the first half of ``inputs``; a fresh one loaded with its state_dict gives
    the same outputs on the second half."""
    original = get_aggregator(name, **hparams)
    call = "aggregate" if original.kind == "grads" else "weights"
    half = len(inputs) // 2
    for x in inputs[:half]:
        getattr(original, call)(x)
    restored = get_aggregator(name, **hparams)
    restored.load_state_dict(original.state_dict())
    for x in inputs[half:]:
        torch.testing.assert_close(getattr(restored, call)(x), getattr(original, call)(x), rtol=0, atol=0)


# -- the non-negative QP under PCD, MGDA and the dual-cone methods, at small K ---------------


def test_the_one_variable_qp_is_solved_in_closed_form() -> None:
    """K = 1 (PCD with one secondary task) skips the iterative solver: min_{v ≥ 0} ½ q v² + b v
    is v = −b/q for b < 0, else 0; the same as the active-set solver, q = 0 included."""
    for q, b in [(2.0, -3.0), (2.0, 3.0), (1e-9, -1e-9), (0.0, 1.0), (5.0, 0.0)]:
        Q, B = torch.tensor([[q]], dtype=torch.float64), torch.tensor([[b], [-b]], dtype=torch.float64)
        v = nonnegative_qp(Q, B)
        expected = torch.stack([nonnegative_qp_active_set(Q, row) for row in B])
        torch.testing.assert_close(v, expected, rtol=1e-12, atol=0)
        if q > 0:
            torch.testing.assert_close(v[:, 0], (-B[:, 0] / q).clamp_min(0), rtol=1e-11, atol=0)
    assert nonnegative_qp(torch.tensor([[4.0]]), torch.tensor([-2.0])).shape == (1,)


def qp_objective(Q: torch.Tensor, B: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((V @ Q) * V).sum(dim=1) + (B * V).sum(dim=1)


@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("K", [2, 3, 4])
def test_small_qps_solved_on_every_support_match_the_active_set(K: int, rank_deficient: bool) -> None:
    """For K ≤ 3 every support is solved at once (K = 4 iterates); the result is feasible and
    as low as the active-set solver's, also for singular Q (two equal rows: no unique
    minimizer)."""
    gen = torch.Generator().manual_seed(K)
    for _ in range(20):
        G = torch.randn(K, 6, dtype=torch.float64, generator=gen)
        if rank_deficient:
            G[1] = G[0]
        Q = G @ G.T
        B = torch.randn(5, K, dtype=torch.float64, generator=gen)
        V = nonnegative_qp(Q, B)
        expected = torch.stack([nonnegative_qp_active_set(Q, b) for b in B])
        assert bool((V >= 0).all())
        torch.testing.assert_close(qp_objective(Q, B, V), qp_objective(Q, B, expected), rtol=1e-9, atol=1e-9)
        if not rank_deficient:
            torch.testing.assert_close(V, expected, rtol=1e-8, atol=1e-10)


# -- PCD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("K", "tau"), [(2, 0.0), (2, 0.3), (3, 0.02), (5, 0.2)])
def test_pcd_is_the_constrained_projection_of_the_primary_gradient(K: int, tau: float, seed: int) -> None:
    G = gradients(K, seed=seed)
    w = get_aggregator("pcd", tau=tau, beta=0.0, eps=0.0).weights(G @ G.T)  # β = 0: v̂ = ‖g_i‖²
    Gn = (G / G.norm(dim=1, keepdim=True)).numpy()  # g̃_i = g_i / ‖g_i‖
    primary = Gn[0]
    constraints = [
        {"type": "ineq", "fun": lambda d, j=j: Gn[j] @ d - tau, "jac": lambda d, j=j: Gn[j]} for j in range(1, K)
    ]
    solved = minimize(
        lambda d: 0.5 * np.sum((d - primary) ** 2),
        primary,
        jac=lambda d: d - primary,
        constraints=constraints,
        method="SLSQP",
        options={"ftol": 1e-13, "maxiter": 500},
    )
    assert solved.success, solved.message
    d_tilde = solved.x
    expected = d_tilde * float(G[0].norm()) / np.linalg.norm(d_tilde)
    d = (G.T @ w).numpy()
    np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-8)
    # every secondary task keeps its share of progress (after the rescaling, in proportion)
    assert bool((Gn[1:] @ d_tilde >= tau - 1e-7).all())


def test_pcd_special_cases() -> None:
    g0, g = torch.randn(2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    aligned = torch.stack([g0, g0 + 0.1 * g])  # no conflict: τ = 0 leaves the primary gradient alone
    w = get_aggregator("pcd", tau=0.0, beta=0.0).weights(aligned @ aligned.T)
    torch.testing.assert_close(aligned.T @ w, g0, rtol=1e-9, atol=1e-12)
    infeasible = torch.stack([g0, g, -g])  # two opposite secondary tasks cannot both progress
    w = get_aggregator("pcd", tau=0.1, beta=0.0).weights(infeasible @ infeasible.T)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    zero_primary = torch.stack([torch.zeros(20, dtype=torch.float64), g])
    assert torch.equal(
        get_aggregator("pcd").weights(zero_primary @ zero_primary.T), torch.zeros(2, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="2 values of tau"):
        get_aggregator("pcd", tau=[0.1, 0.2]).weights(torch.eye(2, dtype=torch.float64))
    for bad in ({"tau": 1.5}, {"tau": [[0.1]]}, {"beta": 1.0}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            get_aggregator("pcd", **bad)


def test_pcd_is_invariant_to_a_constant_scale_of_a_secondary_task() -> None:
    pcd, scaled_pcd = (
        get_aggregator("pcd", tau=0.3, beta=0.9, eps=0.0),
        get_aggregator("pcd", tau=0.3, beta=0.9, eps=0.0),
    )
    for step in range(5):
        G = gradients(3, seed=step)
        scaled = G.clone()
        scaled[2] *= 1e3
        d, d_scaled = G.T @ pcd.weights(G @ G.T), scaled.T @ scaled_pcd.weights(scaled @ scaled.T)
        torch.testing.assert_close(d_scaled, d, rtol=1e-8, atol=1e-10)


def test_pcd_state_round_trips() -> None:
    assert_resumes("pcd", [(G := gradients(4, seed=s)) @ G.T for s in range(6)], tau=0.1, beta=0.5)


# -- MoDo and SDMGrad --------------------------------------------------------------------------


def test_modo_step_is_the_projected_gradient_step() -> None:
    G = gradients(4)
    M = G @ G.T
    gamma, rho = 0.3, 0.2
    modo = get_aggregator("modo", gamma=gamma, rho=rho)
    lam = np.full(4, 0.25)
    A = (M / M.diagonal().mean()).numpy()  # A / s, s = mean squared norm
    for _ in range(3):
        lam = simplex_projection(lam - gamma * (A @ lam + rho * lam))
        np.testing.assert_allclose(modo.weights(M).numpy(), lam, atol=1e-7)


def test_modo_and_sdmgrad_converge_to_mgda_on_a_fixed_gram_matrix() -> None:
    G = gradients(3)
    M = G @ G.T
    expected = min_norm_weights(M.numpy())
    modo = get_aggregator("modo", gamma=0.2)
    for _ in range(2000):
        w = modo.weights(M)
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-5)
    sdmgrad = get_aggregator("sdmgrad", lr=0.2, momentum=0.5, iterations=200, lam=0.0)
    for _ in range(10):
        w = sdmgrad.weights(M)
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-5)


def test_sdmgrad_moves_toward_its_preference_as_lambda_grows() -> None:
    G = gradients(4)
    M = G @ G.T
    preference = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    distances = []
    for lam in (0.0, 1.0, 10.0, 1e4):
        w = get_aggregator("sdmgrad", lr=0.2, iterations=100, lam=lam, preference=preference).weights(M)
        assert abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
        distances.append(float((w - preference).norm()))
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-3
    with pytest.raises(ValueError, match="4 preference weights"):
        get_aggregator("sdmgrad", preference=[0.5, 0.2, 0.2, 0.1]).weights(M[:3, :3])


def test_a_cross_batch_matrix_is_used_through_its_symmetric_part() -> None:
    G1, G2 = gradients(3, seed=1), gradients(3, seed=2)  # two independent batches
    A = G1 @ G2.T
    for name in ("modo", "sdmgrad"):
        a, b = get_aggregator(name), get_aggregator(name)
        torch.testing.assert_close(a.weights(A), b.weights(0.5 * (A + A.T)))


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_double_sampling_methods_state_round_trips(name: str) -> None:
    assert_resumes(name, [(G := gradients(4, seed=s)) @ G.T for s in range(6)])
    with pytest.raises(ValueError, match="K = 4 tasks, now K = 3"):
        method = get_aggregator(name)
        method.weights(torch.eye(4, dtype=torch.float64))
        method.weights(torch.eye(3, dtype=torch.float64))


# -- CR-MOGM -----------------------------------------------------------------------------------


def test_cr_mogm_is_a_moving_average_of_its_base_weights() -> None:
    G = gradients(4)
    M = G @ G.T
    base = get_aggregator("mgda").weights(M)
    alpha = 0.7
    smoothed = get_aggregator("cr_mogm", base="mgda", alpha=alpha)
    start = torch.full((4,), 0.25, dtype=torch.float64)
    for t in range(1, 6):  # λ_t − λ̂ = α^t (λ_0 − λ̂) on a fixed Gram matrix
        torch.testing.assert_close(smoothed.weights(M), base + alpha**t * (start - base), rtol=1e-10, atol=1e-12)
    unsmoothed = get_aggregator("cr_mogm", base="upgrad", alpha=0.0)
    torch.testing.assert_close(unsmoothed.weights(M), get_aggregator("upgrad").weights(M))
    with pytest.raises(TypeError, match="Gram method"):
        get_aggregator("cr_mogm", base="moco")
    with pytest.raises(TypeError, match="Gram method"):
        get_aggregator("cr_mogm", base=get_aggregator("uw", num_tasks=4))
    with pytest.raises(ValueError, match="alpha"):
        get_aggregator("cr_mogm", alpha=1.5)


def test_cr_mogm_state_includes_its_base_state() -> None:
    # the base draws random weights: resuming exactly needs its generator too
    inputs = [(G := gradients(4, seed=s)) @ G.T for s in range(6)]
    assert_resumes("cr_mogm", inputs, base="random", alpha=0.5, base_hparams={"seed": 3})


# -- ExcessMTL ---------------------------------------------------------------------------------


def test_excess_mtl_follows_its_update_equations() -> None:
    eta, eps = 0.5, 1e-7
    method = get_aggregator("excess_mtl", step_size=eta, warmup_steps=2, eps=eps)
    S = torch.zeros(3, 12, dtype=torch.float64)
    alpha = torch.full((3,), 1 / 3, dtype=torch.float64)
    warmup = []
    for step in range(5):
        G = gradients(3, seed=step) * torch.tensor([[1.0], [0.5**step], [2.0]], dtype=torch.float64)
        S = S + G**2
        risks = (G**2 / (S + eps).sqrt()).sum(dim=1)
        if step < 2:
            warmup.append(risks)
        else:
            baseline = torch.stack(warmup).mean(dim=0)
            alpha = alpha * torch.exp(eta * risks / baseline)
            alpha = alpha / alpha.sum()
        torch.testing.assert_close(method.aggregate(G), G.T @ alpha, rtol=1e-10, atol=1e-12)


def test_excess_mtl_shifts_weight_to_the_task_far_from_its_optimum() -> None:
    # task 0's gradient keeps its size (far from its optimum); task 1's shrinks (converging)
    method = get_aggregator("excess_mtl")
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        G = torch.randn(2, 50, generator=gen, dtype=torch.float64) * torch.tensor(
            [[1.0], [0.6**step]], dtype=torch.float64
        )
        method.aggregate(G)
    alpha = method.log_weights.exp()
    assert float(alpha[0]) > 0.9 and abs(float(alpha.sum()) - 1) < 1e-12


def test_excess_mtl_state_round_trips() -> None:
    assert_resumes("excess_mtl", [gradients(3, seed=s) for s in range(6)], warmup_steps=1)
    method = get_aggregator("excess_mtl")
    method.aggregate(gradients(3))
    with pytest.raises(ValueError, match="shape"):
        method.aggregate(gradients(3, P=13))


# -- SDMGrad's inner solve at its defaults -------------------------------------------------------


def sdmgrad_objective(A: torch.Tensor, W: torch.Tensor, lam: float, preference: torch.Tensor) -> torch.Tensor:
    """½ (w + λw̃)ᵀ A (w + λw̃) for a batch of w (rows of W), A already divided by its mean diagonal."""
    V = W + lam * preference
    return 0.5 * ((V @ A) * V).sum(-1)


@pytest.mark.parametrize("K", [2, 4, 7])
def test_sdmgrad_minimises_over_the_simplex_at_its_defaults(K: int) -> None:
    G = gradients(K, seed=K)
    M = G @ G.T
    A = M / M.diagonal().mean()
    preference = torch.full((K,), 1.0 / K, dtype=torch.float64)
    sdmgrad = get_aggregator("sdmgrad")  # lr 10, momentum 0.5, 20 iterations, λ = 0.3
    for _ in range(5):
        combined = sdmgrad.weights(M)
        w = sdmgrad.carried
        assert abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
        torch.testing.assert_close(combined, (w + 0.3 * preference) / 1.3)
        # no point of the simplex does better: 20000 random points, the vertices, the centre
        samples = torch.distributions.Dirichlet(torch.ones(K, dtype=torch.float64)).sample((20000,))
        candidates = torch.cat([samples, torch.eye(K, dtype=torch.float64), preference[None]])
        best = sdmgrad_objective(A, candidates, 0.3, preference).min()
        assert float(sdmgrad_objective(A, w[None], 0.3, preference)) <= float(best) + 1e-12


def test_sdmgrad_with_lambda_zero_gives_mgda_weights_at_the_default_step() -> None:
    G = gradients(4, seed=5)
    M = G @ G.T
    mgda = get_aggregator("mgda").weights(M)
    sdmgrad = get_aggregator("sdmgrad", lam=0.0)
    for _ in range(50):
        w = sdmgrad.weights(M)
    torch.testing.assert_close(w, mgda, rtol=0, atol=1e-9)
    torch.testing.assert_close((G.T @ w).norm(), (G.T @ mgda).norm(), rtol=1e-9, atol=0)


def test_sdmgrad_does_not_amplify_small_perturbations() -> None:
    # two unit-norm gradients: (0.5, 0.5) by symmetry, also when one squared norm is 1 ULP off
    one = torch.tensor(1.0, dtype=torch.float64)
    unit = torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    unit[1, 1] = torch.nextafter(one, torch.tensor(2.0, dtype=torch.float64))
    nudged = unit.clone()
    nudged[0, 0] += 1.5e-12
    a, b = get_aggregator("sdmgrad"), get_aggregator("sdmgrad")
    for _ in range(10):
        wa, wb = a.weights(unit), b.weights(nudged)
    torch.testing.assert_close(wa, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    assert float((wa - wb).abs().max()) < 1e-9


def test_sdmgrad_momentum_solver_is_the_authors_update() -> None:
    G = gradients(3, seed=4)
    M = G @ G.T
    A = (M / M.diagonal().mean()).numpy()
    lr, mu, iterations, lam = 0.05, 0.5, 7, 0.3
    sdmgrad = get_aggregator("sdmgrad", lr=lr, momentum=mu, iterations=iterations, lam=lam, solver="momentum")
    w, target = np.full(3, 1 / 3), np.full(3, 1 / 3)
    for _ in range(2):
        v = np.zeros(3)
        for _ in range(iterations):
            v = mu * v + A @ (w + lam * target)
            w = simplex_projection(w - lr * v)
        np.testing.assert_allclose(sdmgrad.weights(M).numpy(), (w + lam * target) / (1 + lam), atol=1e-12)
    with pytest.raises(ValueError, match="solver"):
        get_aggregator("sdmgrad", solver="adam")
