"""Small K x K solvers in torch (float64, on the device of their input), shared by the aggregators.

- ``nonnegative_qp``: min_v ½ vᵀQv + b_kᵀv  s.t. v ≥ 0 for a batch of b_k, exactly: for K ≤ 3
  an exact solve on every support at once; otherwise batched accelerated projected gradient and
  an exact solve on each identified support, certified by the KKT conditions, with a primal
  active set (``nonnegative_qp_active_set``) as the fallback.
- ``min_norm_simplex``: min_w wᵀMw  s.t. w ≥ 0, Σ w = 1 (MGDA), exactly, through the QP above.
- ``power_fixed_point``: w > 0 with M w = w^(-1/α) (Nash-MTL for α = 1, FairGrad), by damped
  Newton steps on a strictly convex potential.
- ``project_simplex``: Euclidean projection onto the probability simplex, batched.
- ``minimize_on_simplex``: projected gradient for a convex function on the simplex (CAGrad's
  and ConicGrad's duals).
- ``simplex_qp``: min_w ½ wᵀAw + cᵀw  s.t. w ≥ 0, Σ w = 1 (SDMGrad), exactly: projected
  gradient identifies the support, a KKT-certified solve on it finishes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_STEPS = 2.0 ** -torch.arange(0, 40, dtype=torch.float64)


def unit_diagonal_scaling(M: torch.Tensor) -> torch.Tensor:
    """s with s_i = 1/sqrt(M_ii) (1 where M_ii = 0), so that diag(s) M diag(s) has unit diagonal.

    Gradient norms may differ by many orders of magnitude; the scaled matrix is a correlation
    matrix and keeps the solvers well conditioned.
    """
    d = M.diagonal()
    return torch.where(d > 0, d.rsqrt(), torch.ones_like(d))


def nonnegative_qp_active_set(Q: torch.Tensor, b: torch.Tensor, *, tol: float = 1e-12) -> torch.Tensor:
    """min_v ½ vᵀQv + bᵀv subject to v ≥ 0, for symmetric positive semi-definite Q (K x K).

    Lawson–Hanson style active set: free variables solve Q_FF v_F = -b_F; a variable joins F
    while its gradient (Qv + b)_j is negative, and leaves when the step would make it negative.
    KKT at return: (Qv + b)_j ≥ -tol·scale for all j, = 0 on v_j > 0. A ridge of 1e-12·max|Q_ii|
    keeps the sub-systems solvable when Q is singular.
    """
    K = Q.shape[0]
    scale = float(Q.diagonal().abs().max())
    b_scale = float(b.abs().max())
    v = torch.zeros(K, dtype=Q.dtype, device=Q.device)
    if b_scale == 0:
        return v
    ridge = 1e-12 * scale if scale > 0 else 1e-12
    Qr = Q + ridge * torch.eye(K, dtype=Q.dtype, device=Q.device)
    free = torch.zeros(K, dtype=torch.bool, device=Q.device)
    for _ in range(10 * K + 10):
        grad = Q @ v + b
        candidate = torch.where(free, torch.full_like(grad, float("inf")), grad)
        j = int(candidate.argmin())
        if float(candidate[j]) >= -tol * b_scale:
            break
        free[j] = True
        for _ in range(K + 1):
            idx = free.nonzero().squeeze(1)
            z = torch.zeros_like(v)
            z[idx] = torch.linalg.solve(Qr[idx][:, idx], -b[idx])
            if bool((z[idx] > 0).all()):
                v = z
                break
            bad = idx[z[idx] <= 0]
            alpha = float((v[bad] / (v[bad] - z[bad])).min())
            v = v + alpha * (z - v)
            free &= v > 1e-300
            free[j] = free[j] | bool(z[j] > 0)  # the entering variable is kept unless it left
            v = torch.where(free, v, torch.zeros_like(v))
    return v


def _certified_on_support(
    Q: torch.Tensor, B: torch.Tensor, support: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem k: v_S = -Q_SS⁻¹ b_S on the support S_k (0 elsewhere), in one batched solve,
    and whether it satisfies the KKT conditions (v_S > 0, ∇ = Qv + b = 0 on S, ≥ 0 off S)."""
    n, K = B.shape
    sf = support.to(Q.dtype)
    ridge = 1e-12 * Q.diagonal().abs().max().clamp_min(1e-300)
    systems = (
        Q * (sf[:, :, None] * sf[:, None, :])
        + torch.diag_embed(1 - sf)
        + ridge * torch.eye(K, dtype=Q.dtype, device=Q.device)
    )
    v = torch.linalg.solve(systems, (-B * sf).unsqueeze(-1)).squeeze(-1) * sf
    grad = v @ Q + B
    scale = B.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    positive = ((v > 0) | ~support).all(dim=1)
    stationary = torch.where(support, grad.abs() <= tol * scale, grad >= -tol * scale).all(dim=1)
    return v, positive & stationary


# Up to this K, nonnegative_qp solves on all 2^K supports in one batched solve (8 systems of
# 3 x 3 per problem) instead of iterating. Timed side by side on a CPU (MGDA, UPGrad, PCD) it
# was cheaper at K = 3 and no longer at K = 4 (16 systems).
ENUMERATED_K = 3


def _enumerated_supports(Q: torch.Tensor, B: torch.Tensor, tol: float) -> torch.Tensor | None:
    """Each problem's solution on the first of its 2^K supports that the KKT conditions
    certify (the QP is convex, so a certified point is a minimizer); None if some problem has
    no certified support (e.g. a singular Q_SS), for the iterative path to handle."""
    n, K = B.shape
    count = 1 << K
    bits = torch.arange(K, device=B.device)
    supports = (torch.arange(count, device=B.device)[:, None] >> bits) & 1 == 1  # (2^K, K)
    v, ok = _certified_on_support(Q, B.repeat_interleave(count, dim=0), supports.repeat(n, 1), tol)
    ok = ok.view(n, count)
    if not bool(ok.any(dim=1).all()):
        return None
    first = ok.to(torch.int8).argmax(dim=1)
    return v.view(n, count, K)[torch.arange(n, device=B.device), first]


def nonnegative_qp(Q: torch.Tensor, B: torch.Tensor, *, tol: float = 1e-9, max_iter: int = 400) -> torch.Tensor:
    """min_v ½ vᵀQv + bᵀv  s.t. v ≥ 0, for symmetric PSD Q (K x K) and each row b of B (n x K)
    (a single b of shape (K,) is accepted too). Q should be well scaled (e.g. unit diagonal).

    All n problems advance together by accelerated projected gradient (step 1/λ_max(Q),
    FISTA momentum). Every 10 steps each unfinished problem is solved exactly on the support of
    its iterate and kept if the KKT conditions certify the result (``_certified_on_support``).
    Problems not certified after ``max_iter`` steps are solved by the primal active set.
    K = 1 is solved in closed form, v = max(0, −b / q); for K ≤ ``ENUMERATED_K`` every support
    is tried at once (``_enumerated_supports``) before any iteration.
    """
    single = B.ndim == 1
    B = B[None] if single else B
    n, K = B.shape
    if K == 1:  # one variable: v = max(0, -b / q), with the active set's ridge for q = 0
        q = Q[0, 0]
        ridge = torch.where(q != 0, 1e-12 * q.abs(), torch.ones_like(q) * 1e-12)
        result = (-B / (q + ridge)).clamp_min(0)
        return result[0] if single else result
    if K <= ENUMERATED_K:
        solved = _enumerated_supports(Q, B, tol)
        if solved is not None:
            return solved[0] if single else solved
    L = torch.linalg.eigvalsh(Q)[-1].clamp_min(1e-300)
    V = torch.zeros_like(B)
    Y, t = V, 1.0
    result = torch.zeros_like(B)
    done = torch.zeros(n, dtype=torch.bool, device=B.device)
    for it in range(1, max_iter + 1):
        V_next = (Y - (Y @ Q + B) / L).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        Y = V_next + ((t - 1) / t_next) * (V_next - V)
        V, t = V_next, t_next
        if it % 10 == 0:
            exact, ok = _certified_on_support(Q, B, V > 0, tol)
            newly = ok & ~done
            result = torch.where(newly[:, None], exact, result)
            done |= ok
            if bool(done.all()):
                break
    for k in (~done).nonzero().squeeze(1).tolist():
        result[k] = nonnegative_qp_active_set(Q, B[k])
    return result[0] if single else result


def min_norm_simplex(M: torch.Tensor) -> torch.Tensor:
    """w* = argmin_{w ∈ simplex} wᵀMw: the min-norm point of the convex hull of the gradients.

    Solved exactly: with v* = argmin_{v ≥ 0} ½ vᵀMv - 1ᵀv, the KKT conditions (Mv*)_j ≥ 1 (= 1
    where v*_j > 0) become, for w = v*/Σv*, (Mw)_j ≥ 1/Σv* with equality on the support, which
    are the KKT conditions of the min-norm problem. Computed on the unit-diagonal scaling of M.
    """
    s = unit_diagonal_scaling(M)
    Ms = s[:, None] * M * s[None, :]
    v = nonnegative_qp(Ms, -s) * s
    total = v.sum()
    if not total > 0:  # cannot happen for PSD M; guard against a degenerate solve
        return torch.full_like(v, 1.0 / v.numel())
    return v / total


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v (..., K) onto {w ≥ 0, Σ w = 1} (sort-based)."""
    K = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1
    ks = torch.arange(1, K + 1, dtype=v.dtype, device=v.device)
    cond = u - css / ks > 0
    rho = cond.to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def power_fixed_point(M: torch.Tensor, alpha: float, *, max_iter: int = 50, rtol: float = 1e-10) -> torch.Tensor:
    """w > 0 solving M w = w^(-1/α) for PSD M (K x K) and α > 0.

    The equation is the stationarity condition of the strictly convex potential
    φ(w) = ½ wᵀMw - Σ_i h(w_i), h(w) = log w (α = 1) or w^(1-1/α) / (1-1/α) (α ≠ 1).
    We solve in the variables x = w / D, D_i = M_ii^(-1/2), where the potential reads
    ½ xᵀAx - Σ_i c_i h(x_i) with A = DMD of unit diagonal and c_i = D_i^(1-1/α), starting from
    the exact solution for orthogonal gradients (A = I). Gradient norms spread over many decades
    then keep the Hessian well conditioned; the attainable residual of the smallest tasks is
    still limited by float64 cancellation in (Mw)_i when norms differ by ~1e16.

    Damped Newton with Armijo backtracking from the largest step that keeps x > 0 (0.99 of the
    way to the boundary); the quadratic part of φ along the step is evaluated in closed form.
    Stops once every |residual_i| ≤ rtol·c_i x_i^(-1/α) (typically 3-5 steps).

    A ridge of 1e-12·M_ii per task (and, for a zero gradient, 1e-6 times the smallest nonzero
    M_jj) keeps φ bounded below when gradients are zero or linearly dependent; the weight of a
    zero gradient is then large but finite, and it moves nothing. All-zero M gives w = 1.
    """
    K = M.shape[0]
    p = 1.0 / alpha
    d = M.diagonal()
    positive = d > 0
    if not bool(positive.any()):
        return torch.ones(K, dtype=M.dtype, device=M.device)
    smallest = torch.where(positive, d, torch.full_like(d, float("inf"))).min()
    M = M + torch.diag(1e-12 * d + torch.where(positive, torch.zeros_like(d), 1e-6 * smallest))
    D = M.diagonal().rsqrt()
    A = D[:, None] * M * D[None, :]
    c = D ** (1 - p)
    x = c ** (alpha / (alpha + 1))  # the solution when the gradients are orthogonal (A = I)

    def barrier(X: torch.Tensor) -> torch.Tensor:
        return (c * (X.log() if alpha == 1.0 else X ** (1 - p) / (1 - p))).sum()

    for _ in range(max_iter):
        pull = c * x ** (-p)
        Ax = A @ x
        residual = Ax - pull
        if bool((residual.abs() <= rtol * pull).all()):
            break
        hessian = A.clone()
        hessian.diagonal().add_(p * pull / x)
        delta = torch.linalg.solve(hessian, residual)  # the Newton step is x - delta
        shrinking = delta > 0
        step = min(1.0, 0.99 * float((x[shrinking] / delta[shrinking]).min())) if bool(shrinking.any()) else 1.0
        Ad = A @ delta
        xAx, xAd, dAd = float(x @ Ax), float(x @ Ad), float(delta @ Ad)
        f0 = 0.5 * xAx - float(barrier(x))
        slope = -float(residual @ delta)
        while True:
            x_new = x - step * delta
            f = 0.5 * xAx - step * xAd + 0.5 * step * step * dAd - float(barrier(x_new))
            if f <= f0 + 1e-4 * step * slope + 1e-13 * abs(f0) or step < 1e-12:
                break
            step *= 0.5
        x = x_new
    return D * x


def minimize_on_simplex(
    objective: Callable[[torch.Tensor], torch.Tensor],
    gradient: Callable[[torch.Tensor], torch.Tensor],
    w0: torch.Tensor,
    *,
    polish: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    polish_every: int = 2,
    max_iter: int = 500,
    tol: float = 1e-13,
) -> torch.Tensor:
    """argmin of a convex ``objective`` over {w ≥ 0, Σ w = 1}, from ``w0``.

    ``objective`` maps a batch (..., K) to (...); ``gradient`` maps w (K,) to (K,). Projected
    gradient with a batched backtracking search: 30 step lengths 2^0..2^-29 are projected and
    evaluated at once and the best decrease is taken (monotone). Every ``polish_every`` steps,
    ``polish(w)`` may return the exact minimizer on the support of w, certified by the KKT
    conditions, which ends the search. Otherwise stops when the objective decreases by less than
    ``tol`` relative (checked every step on CPU, every 16 elsewhere, to keep host syncs rare).
    """
    steps = _STEPS[:30].to(w0.device)
    check_every = 1 if w0.device.type == "cpu" else 16
    w = w0
    f = objective(w)
    for it in range(max_iter):
        candidates = project_simplex(w - steps[:, None] * gradient(w))
        values = objective(candidates)
        best = values.argmin()
        improved = values[best] < f
        f_new = torch.where(improved, values[best], f)
        w = torch.where(improved, candidates[best], w)
        if polish is not None and it % polish_every == polish_every - 1:
            exact = polish(w)
            if exact is not None:
                return exact
        if it % check_every == 0 and not bool(f - f_new > tol * f_new.abs().clamp_min(1e-300)):
            break
        f = f_new
    exact = polish(w) if polish is not None else None
    return w if exact is None else exact


def simplex_qp(A: torch.Tensor, c: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
    """w* = argmin_{w ∈ simplex} ½ wᵀAw + cᵀw for symmetric PSD A (K x K) and c (K,).

    Projected gradient from ``w0`` (default 1/K; ``minimize_on_simplex``) identifies the support
    S; on it the KKT system [A_SS 1; 1ᵀ 0] [w_S; -ν] = [-c_S; 1] is solved and the result kept
    when it is certified: w_S ≥ 0 and (Aw + c)_j ≥ ν off S (tolerance 1e-9 of the gradient's
    size). A convex QP's certified point is a minimizer; if no support is certified the projected
    gradient's own converged point is returned.
    """
    K = A.shape[0]
    w0 = torch.full((K,), 1.0 / K, dtype=A.dtype, device=A.device) if w0 is None else w0

    def objective(W: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((W @ A) * W).sum(-1) + W @ c

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return A @ w + c

    def polish(w: torch.Tensor) -> torch.Tensor | None:
        support = w > 1e-9 * w.max()
        idx = support.nonzero().squeeze(1)
        n = idx.numel()
        system = torch.zeros(n + 1, n + 1, dtype=A.dtype, device=A.device)
        system[:n, :n] = A[idx][:, idx]
        system[:n, n] = -1.0
        system[n, :n] = 1.0
        rhs = torch.cat([-c[idx], torch.ones(1, dtype=A.dtype, device=A.device)])
        try:
            solution = torch.linalg.solve(system, rhs)
        except RuntimeError:  # singular on this support (linearly dependent gradients)
            return None
        exact = torch.zeros_like(w)
        exact[idx] = solution[:n]
        nu = solution[n]
        grad = A @ exact + c
        tol = 1e-9 * (grad.abs().max() + nu.abs()).clamp_min(1e-300)
        certified = (exact[idx] >= -tol).all() & (grad[~support] >= nu - tol).all()
        return project_simplex(exact) if bool(certified) else None

    exact = polish(w0)
    return exact if exact is not None else minimize_on_simplex(objective, gradient, w0, polish=polish)
