"""Time per K x K solve: our torch solvers against the scipy/cvxpy formulations the reference
implementations use, on the same Gram matrix, with each side's residual recorded.

- FairGrad (α = 1 and 2): scipy ``least_squares`` on r(w) = Mw - w^(-1/α), w ≥ 0, from w = 1/K
  (the FairGrad code's formulation). Residual: max_i |r_i| / w_i^(-1/α).
- CAGrad (c = 0.5): scipy ``minimize`` SLSQP on F(w) = wᵀb + c‖g0‖ sqrt(wᵀMw) over the simplex,
  from w = 1/K (the CAGrad code's formulation). Residual: F(w) - min(F_ours, F_scipy).
- Nash-MTL: cvxpy with ECOS on the concave program max Σ log α + Σ log(Mα) - αᵀMα, whose
  stationarity condition is Mα = 1/α (the Nash-MTL code solves a CCCP sequence of cvxpy
  programs; one program is the cheaper yardstick). Residual as FairGrad with α = 1.
- PCD (τ = 0.1, task 0 primary): scipy ``minimize`` L-BFGS-B on its dual, the non-negative QP
  min_μ≥0 ½ μᵀQμ + cᵀμ over the normalized Gram matrix (the reference code enumerates working
  sets instead, exponential in K). Residual: the dual's KKT violation max_j |min(μ_j, (Qμ + c)_j)|,
  with μ recovered from the weights as w_j / w_0 · s_0 / s_j.

Run:  pytest bench/test_bench_solvers.py --benchmark-json=bench/results/solvers_cpu.json
Needs the bench extra (cvxpy, ecos) for the Nash-MTL row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize

from cost_fast.aggregators import PCD, CAGrad, FairGrad, NashMTL
from cost_fast.aggregators.cagrad import cagrad_dual_weights

KS = [2, 3, 10, 40]


def make_gram(K: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(K)
    G = torch.randn(K, 1000, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        1, 1000, generator=gen, dtype=torch.float64
    )
    G[: K // 3] *= -0.6
    return G @ G.T


def fixed_point_residual(M: np.ndarray, w: np.ndarray, alpha: float) -> float:
    target = w ** (-1 / alpha)
    return float(np.max(np.abs(M @ w - target) / target))


def scipy_fairgrad(M: np.ndarray, alpha: float) -> np.ndarray:
    K = M.shape[0]
    return least_squares(lambda w: M @ w - w ** (-1 / alpha), np.ones(K) / K, bounds=(0, np.inf)).x


def cagrad_objective(M: np.ndarray, w: np.ndarray, c: float) -> float:
    K = M.shape[0]
    b = M.sum(1) / K
    return float(w @ b + c * np.sqrt(M.sum() / K**2) * np.sqrt(max(w @ M @ w, 0.0)))


def scipy_cagrad(M: np.ndarray, c: float) -> np.ndarray:
    K = M.shape[0]
    return minimize(
        lambda w: cagrad_objective(M, w, c),
        np.ones(K) / K,
        bounds=[(0, 1)] * K,
        method="SLSQP",
        constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
    ).x


def cvxpy_nash(M: np.ndarray) -> np.ndarray:
    import cvxpy as cp

    K = M.shape[0]
    a = cp.Variable(K, pos=True)
    objective = cp.sum(cp.log(a)) + cp.sum(cp.log(M @ a)) - cp.quad_form(a, cp.psd_wrap(M))
    cp.Problem(cp.Maximize(objective)).solve(solver=cp.ECOS)
    return np.asarray(a.value)


def run(benchmark, group: str, impl: str, fn, residual) -> None:
    out = fn()
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, residual=residual(out))
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("K", KS)
def test_fairgrad_solve(benchmark, K: int, alpha: float, impl: str) -> None:
    M = make_gram(K)
    M_np = M.numpy()
    method = FairGrad(alpha=alpha)
    fn = (lambda: method(M).double().numpy()) if impl == "ours" else (lambda: scipy_fairgrad(M_np, alpha))
    run(benchmark, f"fairgrad alpha={alpha} K={K}", impl, fn, lambda w: fixed_point_residual(M_np, w, alpha))


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("K", KS)
def test_cagrad_solve(benchmark, K: int, impl: str) -> None:
    M = make_gram(K)
    M_np = M.numpy()
    best = min(
        cagrad_objective(M_np, cagrad_dual_weights(M, 0.5).numpy(), 0.5),
        cagrad_objective(M_np, scipy_cagrad(M_np, 0.5), 0.5),
    )
    if impl == "ours":
        method = CAGrad(c=0.5)

        def fn() -> np.ndarray:
            method(M)  # the full aggregator call, timed
            return cagrad_dual_weights(M, 0.5).numpy()  # its dual weights, for the residual only

        fn_timed = lambda: method(M)  # noqa: E731
    else:
        fn = fn_timed = lambda: scipy_cagrad(M_np, 0.5)  # noqa: E731
    benchmark.group = f"cagrad c=0.5 K={K}"
    benchmark.extra_info.update(impl=impl, residual=cagrad_objective(M_np, fn(), 0.5) - best)
    benchmark.pedantic(fn_timed, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("K", KS)
def test_nash_mtl_solve(benchmark, K: int, impl: str) -> None:
    M = make_gram(K)
    M_np = M.numpy()
    if impl == "reference":
        pytest.importorskip("cvxpy")
        fn = lambda: cvxpy_nash(M_np)  # noqa: E731
    else:
        method = NashMTL()
        fn = lambda: method(M).double().numpy()  # noqa: E731
    run(benchmark, f"nash_mtl K={K}", impl, fn, lambda w: fixed_point_residual(M_np, w, 1.0))


def pcd_dual(M: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(Q, c) of PCD's dual for β = 0, ε = 0: the Gram matrix normalized to unit diagonal."""
    s = 1 / np.sqrt(np.diag(M))
    N = M * np.outer(s, s)
    Q = N[1:, 1:]
    return Q, N[1:, 0] - tau * np.diag(Q)


def pcd_kkt_residual(M: np.ndarray, mu: np.ndarray, tau: float) -> float:
    Q, c = pcd_dual(M, tau)
    return float(np.max(np.abs(np.minimum(mu, Q @ mu + c))))


def scipy_pcd(M: np.ndarray, tau: float) -> np.ndarray:
    Q, c = pcd_dual(M, tau)
    K1 = len(c)
    return minimize(
        lambda mu: 0.5 * mu @ Q @ mu + c @ mu,
        np.zeros(K1),
        jac=lambda mu: Q @ mu + c,
        bounds=[(0, None)] * K1,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12},
    ).x


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("K", KS)
def test_pcd_solve(benchmark, K: int, impl: str) -> None:
    M = make_gram(K)
    M_np = M.numpy()
    tau = 0.1
    if impl == "ours":
        method = PCD(tau=tau, beta=0.0, eps=0.0)
        s = 1 / np.sqrt(np.diag(M_np))

        def fn() -> np.ndarray:
            w = method(M).double().numpy()
            return w[1:] / w[0] * s[0] / s[1:]  # μ_j = w_j / (s_j c) with c = w_0 / s_0

    else:
        fn = lambda: scipy_pcd(M_np, tau)  # noqa: E731
    run(benchmark, f"pcd tau={tau} K={K}", impl, fn, lambda mu: pcd_kkt_residual(M_np, mu, tau))
