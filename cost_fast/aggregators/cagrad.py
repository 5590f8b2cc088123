"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021)."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator
from cost_fast.aggregators.solvers import minimize_on_simplex
from cost_fast.checks import check_nonnegative
from cost_fast.registry import register


def cagrad_on_support(M: torch.Tensor, b: torch.Tensor, s: torch.Tensor, support: torch.Tensor) -> torch.Tensor | None:
    """The exact minimizer of F(w) = wᵀb + s‖Gᵀw‖ on the simplex if its support is ``support``.

    With t = s/‖Gᵀw‖, the KKT conditions on the support S read t M_SS w_S = ν1 - b_S,
    1ᵀw_S = 1, whose solution is w_S = p + q/t with p = M_SS⁻¹1/α, q = (β/α) M_SS⁻¹1 - M_SS⁻¹b_S,
    α = 1ᵀM_SS⁻¹1, β = 1ᵀM_SS⁻¹b_S. Since pᵀM_SS q = 0, ‖Gᵀw‖² = 1/α + qᵀM_SS q/t², and
    t = s/‖Gᵀw‖ gives t = sqrt(α (s² - qᵀM_SS q)). The candidate is returned only if it passes
    the KKT certificate (w_S > 0; ∇F_j ≥ ν off S), which proves it optimal (F is convex).
    """
    idx = support.nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    M_SS = M[idx][:, idx]
    inv = torch.linalg.pinv(M_SS, hermitian=True)
    x1, xb = inv.sum(dim=1), inv @ b[idx]
    alpha, beta = x1.sum(), xb.sum()
    if not bool(alpha > 0):
        return None
    q = (beta / alpha) * x1 - xb
    disc = s * s - q @ M_SS @ q
    if not bool(disc > 0):
        return None
    t = (alpha * disc).sqrt()
    w_S = x1 / alpha + q / t
    if not bool((w_S > 0).all()):
        return None
    w = torch.zeros_like(b)
    w[idx] = w_S
    grad = b + t * (M @ w)
    nu = grad[idx].mean()
    scale = grad.abs().max().clamp_min(1e-300)
    on_support = (grad[idx] - nu).abs().max() <= 1e-9 * scale
    off_support = (grad[~support] >= nu - 1e-9 * scale).all()
    return w if bool(on_support & off_support) else None


def cagrad_dual_weights(M: torch.Tensor, c: float) -> torch.Tensor:
    """w* = argmin_{w ∈ simplex} F(w),  F(w) = wᵀb + sqrt(φ) ‖Gᵀw‖,  b = M1/K,  φ = c²‖g0‖².

    M is first scaled by its mean diagonal (w* is invariant to that scale). Projected gradient
    (``minimize_on_simplex``, ∇F = b + sqrt(φ) Mw/‖Gᵀw‖) identifies the support, and
    ``cagrad_on_support`` solves the problem exactly on it, with a KKT certificate.
    """
    K = M.shape[0]
    scale = M.diagonal().mean()
    M = M / torch.where(scale > 0, scale, torch.ones_like(scale))
    b = M.sum(dim=1) / K
    sqrt_phi = c * (b.sum() / K).clamp_min(0).sqrt()

    def objective(W: torch.Tensor) -> torch.Tensor:
        return W @ b + sqrt_phi * ((W @ M) * W).sum(-1).clamp_min(0).sqrt()

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return b + sqrt_phi * (M @ w) / (w @ M @ w).clamp_min(1e-300).sqrt()

    def polish(w: torch.Tensor) -> torch.Tensor | None:
        # entries still shrinking toward 0 are left out early; the KKT certificate keeps this safe
        return cagrad_on_support(M, b, sqrt_phi, w > 1e-3 * w.max())

    w0 = torch.full((K,), 1.0 / K, dtype=M.dtype, device=M.device)
    exact = polish(w0)  # all tasks in the support is common when conflicts are mild
    return exact if exact is not None else minimize_on_simplex(objective, gradient, w0, polish=polish)


@register("cagrad")
class CAGrad(Aggregator):
    """CAGrad: the update maximizing the worst local improvement within a ball around g0,

        max_d min_i g_iᵀd   s.t.  ‖d - g0‖ ≤ c‖g0‖,

    through its dual: w* = argmin_{w ∈ simplex} wᵀG g0 + c‖g0‖ ‖Gᵀw‖, then
    d = g0 + (c‖g0‖ / ‖Gᵀw*‖) Gᵀw*, so the weights are 1/K + (c‖g0‖/‖Gᵀw*‖) w*, divided by
    (1 + c²) if ``rescale == 1`` or by (1 + c) if ``rescale == 2`` (as in the paper's code).

    Args:
        c: radius ratio 0 ≤ c ≤ 1e150 (default 0.5; c = 0 is the mean gradient).
        rescale: 0, 1 (default) or 2.
    """

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        self.c = check_nonnegative("c", c)
        if self.c > 1e150:  # the weights are divided by 1 + c², which must stay a finite float
            raise ValueError(f"c must be at most 1e150 (its square is used), got {c!r}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = rescale

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        mean = torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
        if self.c == 0:
            return mean
        w = cagrad_dual_weights(gram, self.c)
        g0_norm = (gram.sum() / K**2).clamp_min(0).sqrt()
        gw_norm = (w @ gram @ w).clamp_min(0).sqrt()
        coef = torch.where(gw_norm > 0, self.c * g0_norm / gw_norm.clamp_min(1e-300), torch.zeros_like(gw_norm))
        weights = mean + coef * w
        if self.rescale == 1:
            weights = weights / (1 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1 + self.c)
        return weights
