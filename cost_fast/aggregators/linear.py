"""Linear scalarization: fixed, equal task weights."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator, check_task_vector, task_vector_or_mean
from cost_fast.checks import check_seed
from cost_fast.registry import register


@register("mean")
class Mean(Aggregator):
    """Linear scalarization, mean: w_i = 1/K, so d = g0 = (1/K) Σ_i g_i."""

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        return torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)


@register("sum")
class Sum(Aggregator):
    """Linear scalarization, sum: w_i = 1, so d = Σ_i g_i."""

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)


@register("constant")
class Constant(Aggregator):
    """Constant weights given up front: w = ``weights``, so d = Σ_i w_i g_i.

    Args:
        weights: one number per task (default: None, which means 1/K each: the mean).
    """

    def __init__(self, weights: torch.Tensor | list[float] | None = None) -> None:
        self.constant = check_task_vector("weights", weights)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        return task_vector_or_mean(self.constant, gram, "Constant", "weights")


@register("random")
class Random(Aggregator):
    """Random weighting of the gradients (the gradient form of RLW, Lin et al., TMLR 2022): a fresh
    w = softmax(z), z ~ N(0, I), at every call, so d = Gᵀw with w on the simplex.

    Args:
        seed: seed of z (the generator's state is the ``state_dict``).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_seed("seed", seed)
        self._generator = torch.Generator().manual_seed(seed)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        z = torch.randn(gram.shape[0], generator=self._generator, dtype=torch.float64)
        return torch.softmax(z, dim=0).to(dtype=gram.dtype, device=gram.device)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng_state": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generator.set_state(state["rng_state"])
