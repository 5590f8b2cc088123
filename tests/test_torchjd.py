"""What a torchjd user brings: torchjd's Gram-weighted aggregators and weightings work as methods
(held to torchjd's own mtl_backward + jac_to_grad), anything else torchjd has is refused with the
cost_fast method to use, heads get torchjd's unweighted gradients with head_gradients="per_task",
and accumulation means what the docs say it means."""

from __future__ import annotations

import os

import pytest
import torch
from tug import K, Tug, tug_batches

from cost_fast import COST, get_aggregator, mtl_backward

if os.environ.get("COST_FAST_CHECKOUT"):  # the README's test command installs the dev extra
    import torchjd  # noqa: F401
torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation  # noqa: E402
from torchjd.autojac import jac_to_grad  # noqa: E402
from torchjd.autojac import mtl_backward as torchjd_mtl_backward  # noqa: E402


def losses_of(model: Tug, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, the K losses computed from them), as torchjd's mtl_backward wants both."""
    x, targets = batch
    h = model.backbone(x)
    out = torch.cat([head(h) for head in model.heads], dim=1)
    return h, ((out - targets) ** 2).mean(dim=0) + (h.sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def torchjd_grads(model: Tug, batch, aggregator) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    features, losses = losses_of(model, batch)
    torchjd_mtl_backward(list(losses), features=features, retain_graph=True)
    jac_to_grad(list(model.backbone.parameters()), aggregator)
    return grads_of(model)


def ours(model: Tug, batch, method, head_gradients: str = "per_task") -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _, losses = losses_of(model, batch)
    mtl_backward(losses, model.backbone, method, head_gradients=head_gradients)
    return grads_of(model)


def problem(seed: int = 0):
    torch.manual_seed(seed)
    return Tug().double(), tug_batches(seed, 2, torch.float64)


@pytest.mark.parametrize("name", ["UPGrad", "MGDA", "IMTLG", "DualProj", "PCGrad", "AlignedMTL"])
def test_torchjds_gram_weighted_aggregators_give_torchjds_own_update(name: str) -> None:
    model, batches = problem()
    for batch in batches:
        torch.manual_seed(1)  # PCGrad draws its order from torch's generator
        expected = torchjd_grads(model, batch, getattr(aggregation, name)())
        torch.manual_seed(1)
        got = ours(model, batch, getattr(aggregation, name)())  # the torchjd object itself
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.manual_seed(1)
        weighting = ours(model, batch, getattr(aggregation, f"{name}Weighting")())
        assert all(torch.equal(a, b) for a, b in zip(weighting, got))


def test_the_heads_get_torchjds_gradients_with_per_task_and_ours_by_default() -> None:
    model, batches = problem(1)
    expected = torchjd_grads(model, batches[0], aggregation.Mean())  # heads: ∇L_i each, unweighted
    per_task = ours(model, batches[0], get_aggregator("mean"))
    for a, b in zip(per_task, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # the default: the heads get ∇ Σ w_i L_i, i.e. head i w_i ∇L_i (1/K of torchjd's under "mean")
    weighted = ours(model, batches[0], get_aggregator("mean"), head_gradients="weighted")
    shared = len(list(model.backbone.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(weighted[:shared], per_task[:shared]))  # the backbone alike
    for a, b in zip(weighted[shared:], per_task[shared:]):
        torch.testing.assert_close(a, b / K, rtol=1e-12, atol=1e-15)


def test_what_torchjd_has_that_needs_the_jacobian_or_keeps_state_is_refused_with_our_method() -> None:
    model, batches = problem()
    _, losses = losses_of(model, batches[0])
    cases = {
        aggregation.Mean(): "get_aggregator('mean')",
        aggregation.GradDrop(): "get_aggregator('graddrop')",
        aggregation.PCD(): "get_aggregator('pcd')",  # keeps state
    }
    for method, instead in cases.items():
        with pytest.raises(TypeError, match=instead.replace("(", r"\(").replace(")", r"\)")):
            mtl_backward(losses, model.backbone, method)
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="not a cost_fast method or a function gram -> weights"):
        mtl_backward(losses, model.backbone, torch.nn.Linear(K, K))
    optimizer = torch.optim.Adam(model.parameters())
    loss_fn = lambda m, batch: losses_of(m, batch)[1]  # noqa: E731
    cost = COST(model, model.backbone, aggregation.UPGrad(), optimizer, loss_fn=loss_fn, teleport_data=batches)
    cost.step(loss_fn(model, batches[0]), batches[0])  # COST takes torchjd's weightings too
    with pytest.raises(TypeError, match="get_aggregator\\('mean'\\)"):
        COST(model, model.backbone, aggregation.Mean(), optimizer, loss_fn=loss_fn, teleport_data=batches)


@pytest.mark.parametrize("name", ["mean", "mgda"])
def test_accumulation_adds_each_micro_batchs_own_update(name: str) -> None:
    """docs/guide.md: accumulated micro-batches add their updates, each solved on its own G; for
    a linear method that is the update of the whole batch (twice it, for mean losses of two equal
    halves), for a non-linear one it is not."""
    torch.manual_seed(0)
    model = Tug().double()
    ((x, t),) = tug_batches(3, 1, torch.float64, size=64)
    halves = [(x[:32], t[:32]), (x[32:], t[32:])]
    model.zero_grad(set_to_none=True)
    for half in halves:
        mtl_backward(losses_of(model, half)[1], model.backbone, get_aggregator(name))
    accumulated = grads_of(model)
    separate = [ours(model, half, get_aggregator(name), head_gradients="weighted") for half in halves]
    for a, b, c in zip(accumulated, *separate):
        torch.testing.assert_close(a, b + c, rtol=1e-12, atol=1e-15)
    whole = ours(model, (x, t), get_aggregator(name), head_gradients="weighted")
    gap = max(float((a - 2 * w).abs().max() / (2 * w).abs().max()) for a, w in zip(accumulated, whole))
    if name == "mean":
        assert gap < 1e-12
    else:
        assert gap > 1e-3  # MGDA's weights differ between the halves and the whole batch
