"""Methods that need the elements of the task gradients, not only their Gram matrix:
GradDrop and MoCo (``kind = "grads"``; call ``aggregate(G)``)."""

from __future__ import annotations

from typing import Any

import torch

from cost_fast.aggregators.base import GradientAggregator, clone_or_none
from cost_fast.aggregators.solvers import project_simplex
from cost_fast.checks import check_nonnegative, check_positive, check_seed
from cost_fast.kernels.gram_torch import check_grad_matrix
from cost_fast.registry import register


@register("graddrop")
class GradDrop(GradientAggregator):
    """GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
    Sign Dropout", NeurIPS 2020). Per coordinate p, with the sign purity

        P_p = ½ (1 + Σ_i g_ip / Σ_i |g_ip|)   and U_p ~ Uniform(0, 1),

    keep the positive components where P_p > U_p and the negative ones where P_p < U_p:
    d_p = Σ_i [ (P_p > U_p) [g_ip > 0] + (P_p < U_p) [g_ip < 0] ] g_ip. (Applied here to the
    shared-parameter gradients; the paper applies it at a chosen layer's activations.)

    Args:
        seed: seed of U (a generator per device; its state is the ``state_dict``).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed("seed", seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        check_grad_matrix(G)
        G32 = G if G.dtype == torch.float32 else G.float()
        total_abs = G32.abs().sum(dim=0)
        purity = 0.5 * (1 + G32.sum(dim=0) / total_abs.clamp_min(1e-30))
        u = torch.rand(G32.shape[1], generator=self._generator(G.device), device=G.device)
        keep = ((purity > u)[None, :] & (G32 > 0)) | ((purity < u)[None, :] & (G32 < 0))
        return (G32 * keep).sum(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "rng_states": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generators = {}
        for key, rng_state in state["rng_states"].items():
            self._generator(torch.device(key)).set_state(rng_state)


@register("moco")
class MoCo(GradientAggregator):
    """MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR 2023): MGDA on tracked (moving-average) gradients Y,

        Y ← Y - β (Y - G),     λ ← Π_simplex(λ - (γ/s) (Y Yᵀ + ρ I) λ),     d = Yᵀλ,

    with Y = G and λ = 1/K at the first step, and s = mean_i ‖y_i‖² + ρ (our normalization, so
    that γ does not depend on the scale of the gradients). Constant β, γ (the paper's decaying schedules are
    left to the caller, who may change ``beta``/``gamma`` between steps).

    Args:
        beta: tracking rate β ∈ (0, 1] (default 0.5). gamma: step γ > 0 on λ (default 0.1).
        rho: ridge ρ ≥ 0 (default 0).
    """

    state_like_gradients = True  # its state is K x P: not copied at every step

    def __init__(self, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0) -> None:
        self.beta = check_positive("beta", beta)
        if self.beta > 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        self.gamma = check_positive("gamma", gamma)
        self.rho = check_nonnegative("rho", rho)
        self.tracked: torch.Tensor | None = None
        self.lam: torch.Tensor | None = None

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        check_grad_matrix(G)
        G32 = G if G.dtype == torch.float32 else G.float()
        K = G.shape[0]
        if self.tracked is None:
            self.tracked = G32.clone()
            self.lam = torch.full((K,), 1.0 / K, device=G.device)
        elif self.tracked.shape != G.shape:
            raise ValueError(f"MoCo tracks gradients of shape {tuple(self.tracked.shape)}, got {tuple(G.shape)}")
        else:
            self.tracked.lerp_(G32, self.beta)
        Y = self.tracked
        gram = (Y @ Y.T).double() + self.rho * torch.eye(K, dtype=torch.float64, device=G.device)
        lam = self.lam.double()
        scale = gram.diagonal().mean().clamp_min(1e-300)
        lam = project_simplex(lam - self.gamma * (gram @ lam) / scale)
        self.lam = lam.float()
        return Y.T @ self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"tracked": clone_or_none(self.tracked), "lam": clone_or_none(self.lam)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracked, self.lam = clone_or_none(state["tracked"]), clone_or_none(state["lam"])
