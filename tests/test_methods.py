"""cost_fast.methods: every registered method, built by name, checks its hyper-parameters when it
is built: a bad value is refused there with a ValueError or TypeError naming it, or (for what
depends on K, unknown until the first Gram matrix) with a ValueError at the first step, naming
the method; a value it takes gives finite weights or updates. No other exception, no NaN."""

from __future__ import annotations

import inspect

import pytest
import torch

from cost_fast.methods import get_aggregator, list_aggregators
from cost_fast.registry import REGISTRY

K = 3
BAD = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -1,
    -1.0,
    0,
    0.0,
    2.5,
    10**30,
    1e308,
    -1e308,
    "abc",
    None,
    True,
    [1, 2],
    [float("nan")] * K,
    [1.0] * 5,
]


def cases() -> list[tuple[str, str, object]]:
    found = []
    for name, cls in sorted(REGISTRY.items()):
        for pname, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if pname != "num_tasks" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                found += [(name, pname, bad) for bad in BAD]
    return found


def first_step(method, kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    G = torch.randn(K, 20, dtype=torch.float64)
    G[1] = -G[0] + 0.1 * torch.randn(20, dtype=torch.float64)
    if kind == "gram":
        return method.weights(G @ G.T)
    if kind == "grads":
        return method.aggregate(G)
    losses = (torch.rand(K, dtype=torch.float64) + 0.1).requires_grad_()
    return torch.cat([method.weights(losses), method(losses).detach().reshape(1)])


@pytest.mark.parametrize(("name", "hparam", "bad"), cases(), ids=lambda v: repr(v)[:20])
def test_every_hyperparameter_is_checked_when_the_method_is_built(name: str, hparam: str, bad) -> None:
    kind = list_aggregators()[name]
    extra = {"num_tasks": K} if kind == "loss" else {}
    try:
        method = get_aggregator(name, **{hparam: bad}, **extra)
    except (ValueError, TypeError) as err:
        assert str(err), "an error that names nothing"
        return
    try:
        out = first_step(method, kind)
    except ValueError as err:  # only what needs K: the method and the mismatch named
        assert type(method).__name__ in str(err) and ("task" in str(err) or "K" in str(err)), str(err)
        return
    assert bool(torch.isfinite(out).all()), f"{name}({hparam}={bad!r}) took the value and gave {out.tolist()}"


def test_the_registry_lists_every_method_once_with_its_kind() -> None:
    kinds = list_aggregators()
    assert set(kinds) == set(REGISTRY) and set(kinds.values()) == {"gram", "grads", "loss"}
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        get_aggregator("nope")
    with pytest.raises(ValueError, match="num_tasks=K"):
        get_aggregator("uw")
