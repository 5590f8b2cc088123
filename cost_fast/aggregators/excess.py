"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch

from cost_fast.aggregators.base import GradientAggregator, clone_or_none
from cost_fast.checks import check_int, check_nonnegative, check_positive
from cost_fast.kernels.gram_torch import check_grad_matrix, upcast_16bit
from cost_fast.registry import register


@register("excess_mtl")
class ExcessMTL(GradientAggregator):
    """Weight each task by how far it is from its own optimum (its excess risk), not by its
    loss, so that tasks with noisy labels (a high loss that cannot be reduced) do not take
    over. The excess risk of task i is estimated to second order with a diagonal AdaGrad
    curvature accumulated over the calls:

        S ← S + G ∘ G,    E_i = Σ_p g_ip² / sqrt(S_ip + ε),

    and the weights α (on the simplex, 1/K at the start) take one exponentiated gradient step
    on the excess risks relative to their baseline E⁰ (the mean of E over the first
    ``warmup_steps`` calls, during which α stays 1/K; the first call's E when 0):

        α_i ← α_i exp(η E_i / E⁰_i) / Σ_j α_j exp(η E_j / E⁰_j),    d = Gᵀ α.

    S (K x P, as large as G) and α are the state. The paper suggests a warm-up of several
    epochs; the authors' code uses one call.

    Args:
        step_size: η > 0 (default 1). warmup_steps: ≥ 0 (default 1). eps: ε ≥ 0 (default 1e-7).
    """

    state_like_gradients = True  # its state is K x P: not copied at every step

    def __init__(self, step_size: float = 1.0, warmup_steps: int = 1, eps: float = 1e-7) -> None:
        self.step_size = check_positive("step_size", step_size)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.eps = check_nonnegative("eps", eps)
        self.sq_grad_sum: torch.Tensor | None = None  # S, (K, P) in G's dtype (float32 for 16-bit G)
        self.log_weights: torch.Tensor | None = None  # log α, float64 (K,)
        self.warmup_sum: torch.Tensor | None = None  # Σ of E over the warm-up calls
        self.baseline: torch.Tensor | None = None  # E⁰
        self.steps = 0

    def excess_risks(self, G: torch.Tensor) -> torch.Tensor:
        """Add G ∘ G to S and return E (float64, (K,))."""
        G32 = upcast_16bit(G)  # no copy when aggregate has upcast it already
        K = G.shape[0]
        if self.sq_grad_sum is None:
            self.sq_grad_sum = torch.zeros_like(G32)
            self.log_weights = torch.full((K,), 1.0 / K, dtype=torch.float64, device=G.device).log()
            self.warmup_sum = torch.zeros(K, dtype=torch.float64, device=G.device)
        elif self.sq_grad_sum.shape != G.shape:
            raise ValueError(
                f"ExcessMTL accumulates gradients of shape {tuple(self.sq_grad_sum.shape)}, got {tuple(G.shape)}"
            )
        # The state stays on G's device (moved once if it was loaded elsewhere), so that a step
        # reads nothing back to the host; no copy when it is already there.
        self.sq_grad_sum = self.sq_grad_sum.to(G.device, G32.dtype)
        self.log_weights, self.warmup_sum = self.log_weights.to(G.device), self.warmup_sum.to(G.device)
        if self.baseline is not None:
            self.baseline = self.baseline.to(G.device)
        squares = G32 * G32
        self.sq_grad_sum.add_(squares)  # in place: S is as large as G
        return (squares / (self.sq_grad_sum + self.eps).sqrt()).sum(dim=1).double()

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        check_grad_matrix(G)
        G_acc = upcast_16bit(G)  # one upcast for both uses
        risks = self.excess_risks(G_acc)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.warmup_sum += risks
        else:
            if self.baseline is None:
                self.baseline = self.warmup_sum / self.warmup_steps if self.warmup_steps else risks
            # a task whose baseline is 0 (zero gradients so far) is not reweighted
            positive = self.baseline > 0
            ratios = torch.where(positive, risks / torch.where(positive, self.baseline, 1.0), 0.0)
            self.log_weights = torch.log_softmax(self.log_weights + self.step_size * ratios, dim=0)
        return G_acc.T @ self.log_weights.exp().to(G_acc.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sq_grad_sum": clone_or_none(self.sq_grad_sum),
            "log_weights": clone_or_none(self.log_weights),
            "warmup_sum": clone_or_none(self.warmup_sum),
            "baseline": clone_or_none(self.baseline),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("sq_grad_sum", "log_weights", "warmup_sum", "baseline"):
            setattr(self, key, clone_or_none(state[key]))
        self.steps = int(state["steps"])
