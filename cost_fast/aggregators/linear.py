"""Linear scalarization: fixed, equal task weights."""

from __future__ import annotations

import torch

from cost_fast.aggregators.base import Aggregator, register


@register("mean")
class Mean(Aggregator):
    """Linear scalarization, mean: w_i = 1/K, so d = g0 = (1/K) Σ_i g_i."""

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = gram.shape[0]
        return torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)


@register("sum")
class Sum(Aggregator):
    """Linear scalarization, sum: w_i = 1, so d = Σ_i g_i."""

    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
