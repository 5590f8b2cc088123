"""Methods of stochastic multi-objective optimization that carry their task weights from one
step to the next: MoDo, SDMGrad (double sampling) and CR-MOGM (smoothing of any Gram method).

MoDo and SDMGrad are analysed with A = G₁G₂ᵀ, the product of the task gradients of two
independent batches, an unbiased estimate of ḠḠᵀ (its symmetric part, which ``weights`` uses,
is unbiased too). ``weights`` takes that A or, as under COST, the Gram matrix of one batch.
Both update their weights by gradient steps on λ ↦ ½ λᵀAλ, on A / s with
s = mean_i |A_ii| (the mean squared gradient norm), so that the step sizes do not depend on
the scale of the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cost_fast.aggregators.base import Aggregator, check_task_vector, clone_or_none, task_vector_or_mean
from cost_fast.aggregators.solvers import project_simplex, simplex_qp
from cost_fast.checks import check_int, check_nonnegative, check_positive, check_rate
from cost_fast.registry import REGISTRY, register


def _normalized(A: torch.Tensor) -> torch.Tensor:
    """A / s with s = mean_i |A_ii| (A itself when s = 0: all gradients are zero); no host read."""
    s = A.diagonal().abs().mean()
    return A / torch.where(s > 0, s, torch.ones_like(s))


class _CarriedWeights(Aggregator):
    """Base of methods whose state is one weight vector on the simplex, 1/K before the first call."""

    def __init__(self) -> None:
        self.carried: torch.Tensor | None = None  # float64 (K,), on the Gram matrix's device

    def _previous(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        if self.carried is None:
            return torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
        if self.carried.shape[0] != K:
            raise ValueError(f"{type(self).__name__} was used with K = {self.carried.shape[0]} tasks, now K = {K}")
        return self.carried.to(gram.device, gram.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": clone_or_none(self.carried)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = clone_or_none(state["weights"])


@register("modo")
class MoDo(_CarriedWeights):
    """MoDo (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023): one projected gradient step on the
    weights per call,

        λ ← Π_simplex(λ − γ (A/s + ρ I) λ),    w = λ (the updated one),

    from λ = 1/K; with A from two independent batches (module docstring) the step is unbiased,
    and on a fixed A with ρ = 0 the weights converge to MGDA's.

    Args:
        gamma: step γ > 0 (default 0.1). rho: ridge ρ ≥ 0 (default 0).
    """

    def __init__(self, gamma: float = 0.1, rho: float = 0.0) -> None:
        super().__init__()
        self.gamma = check_positive("gamma", gamma)
        self.rho = check_nonnegative("rho", rho)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        lam = self._previous(gram)
        lam = project_simplex(lam - self.gamma * (_normalized(gram) @ lam + self.rho * lam))
        self.carried = lam.detach().clone()
        return lam


@register("sdmgrad")
class SDMGrad(_CarriedWeights):
    """SDMGrad (Xiao et al., "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023): the direction closest to a preferred one among
    those that make progress on every task,

        w* = argmin_{w ∈ simplex} ½ ‖Gᵀ(w + λ w̃)‖² = ½ (w + λw̃)ᵀ(A/s)(w + λw̃),
        result (w* + λ w̃) / (1 + λ).

    λ = 0 gives MGDA's weights, λ → ∞ the preference w̃. ``solver`` says how w* is found:

    - ``"exact"`` (default): the simplex QP solved to its KKT conditions (``simplex_qp``), warm
      started from the weights of the last call, so every call returns the minimizer;
    - ``"momentum"``: the authors' update, ``iterations`` projected momentum steps per call from
      the weights of the last call, v = 0 at the start of each call,

          v ← μ v + (A/s)(w + λ w̃),   w ← Π_simplex(w − η v).

      It approaches w* across calls only when η·λ_max(A/s) < 2(1 + μ); at the authors' η = 10
      (λ_max(A/s) ≥ 1) it does not, and small perturbations of A grow from call to call.

    Args:
        lr: step η > 0 of ``"momentum"`` (default 10, as the authors' experiments).
        momentum: μ ∈ [0, 1) of ``"momentum"`` (default 0.5).
        iterations: steps per call ≥ 1 of ``"momentum"`` (default 20).
        lam: λ ≥ 0 (default 0.3).
        preference: w̃, one weight per task (default 1/K each: the mean gradient).
        solver: ``"exact"`` (default) or ``"momentum"``.
    """

    SOLVERS = ("exact", "momentum")

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        iterations: int = 20,
        lam: float = 0.3,
        preference: Sequence[float] | torch.Tensor | None = None,
        solver: str = "exact",
    ) -> None:
        super().__init__()
        self.lr = check_positive("lr", lr)
        self.momentum = check_rate("momentum", momentum)
        self.iterations = check_int("iterations", iterations, 1)
        self.lam = check_nonnegative("lam", lam)
        self.preference = check_task_vector("preference", preference)
        if solver not in self.SOLVERS:
            raise ValueError(f"solver must be one of {self.SOLVERS}, got {solver!r}")
        self.solver = solver

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        target = task_vector_or_mean(self.preference, gram, "SDMGrad", "preference weights")
        A = _normalized(gram)
        w = self._previous(gram)
        if self.solver == "exact":
            # ½ (w + λw̃)ᵀA(w + λw̃) = ½ wᵀAw + λ(Aw̃)ᵀw + constant
            w = simplex_qp(A, self.lam * (A @ target), w)
        else:
            velocity = torch.zeros_like(w)
            for _ in range(self.iterations):
                velocity = self.momentum * velocity + A @ (w + self.lam * target)
                w = project_simplex(w - self.lr * velocity)
        self.carried = w.detach().clone()
        return (w + self.lam * target) / (1 + self.lam)


@register("cr_mogm")
class CRMOGM(_CarriedWeights):
    """CR-MOGM (Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond", NeurIPS 2022): the weights of any Gram method, smoothed by a
    moving average across calls,

        λ_t = α λ_{t−1} + (1 − α) λ̂_t,    λ_0 = 1/K,    λ̂_t = base.weights(M_t),

    which is what makes stochastic MGDA-type methods converge (the paper lets α_t → 1 as the
    learning rate decays; change ``alpha`` between steps for that).

    Args:
        base: the smoothed method: a registered name (default "mgda") or a Gram ``Aggregator``.
        alpha: α ∈ [0, 1] (default 0.9; 0 is the base method itself).
        base_hparams: hyperparameters of ``base`` when it is given by name.
    """

    def __init__(
        self, base: str | Aggregator = "mgda", alpha: float = 0.9, base_hparams: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if isinstance(base, str):
            # every Gram method is registered: the package cost_fast.aggregators imports them all
            if base not in REGISTRY:
                raise ValueError(f"unknown aggregator {base!r}; known: {', '.join(sorted(REGISTRY))}")
            base = REGISTRY[base](**(base_hparams or {}))
        elif base_hparams:
            raise ValueError("base_hparams are for a base given by name; this base is already built")
        if not isinstance(base, Aggregator) or base.kind != "gram":
            raise TypeError(
                f"CR-MOGM smooths the weights of a Gram method; got {type(base).__name__} "
                f"(kind {getattr(base, 'kind', '?')!r})"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.base = base
        self.alpha = float(alpha)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        previous = self._previous(gram)
        fresh = self.base.weights(gram).to(gram.dtype)
        lam = self.alpha * previous + (1 - self.alpha) * fresh
        self.carried = lam.detach().clone()
        return lam

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base.load_state_dict(state["base"])
