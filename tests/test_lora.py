"""The teleport adapter in weight space: the model is never modified but by a merge (its modules,
checkpoint keys and generators as they were), ΔW is peft's update, forwards at W + ΔW, merged
exactly, applied and restored bit-exactly, frozen layers never adapted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cost_fast import TaskGradients
from cost_fast.models import CelebACNN
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.perturbed import losses_at


def small_model(seed: int = 0) -> CelebACNN:
    torch.manual_seed(seed)
    return CelebACNN(num_tasks=3, width=2).eval()


METHODS = ["lora", "loha"]
ALPHA = 3.0


def forward_at(model, adapter, x, deltas=None):
    """The model's output with the adapter's weights in effect (functional, differentiable)."""
    deltas = adapter.deltas() if deltas is None else deltas
    name_of = {id(p): name for name, p in model.named_parameters()}
    effective = {name_of[id(w)]: w + d for w, d in zip(adapter.adapted_weights, deltas)}
    return losses_at(model, lambda m, batch: m(batch), x, effective)


def randomize(adapter) -> None:
    with torch.no_grad():
        for p in adapter.adapter_parameters:
            p.normal_(std=0.3)


@pytest.mark.parametrize("method", METHODS)
def test_building_and_using_the_adapter_leaves_the_model_as_it_was(method: str) -> None:
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    keys = list(model.state_dict())
    modules = [(name, type(m)) for name, m in model.named_modules()]
    params = list(model.backbone.parameters())
    weights = [p.detach().clone() for p in params]
    engine = TaskGradients(params, num_tasks=3)
    rng = torch.get_rng_state()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    assert adapter.base_parameters == params and all(p.requires_grad for p in params)
    assert len(adapter.names) == 9  # 7 convs + 2 linears
    adapter.reset()
    assert torch.equal(torch.get_rng_state(), rng)  # the factors come from the adapter's generator
    torch.testing.assert_close(forward_at(model, adapter, x), before)  # the reset adapter is the identity
    randomize(adapter)
    with adapter.applied(adapter.deltas()):
        assert not torch.allclose(model(x), before)
    assert list(model.state_dict()) == keys and [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # applied() put W back bit-exactly
    assert torch.equal(model(x), before)
    # the engine built before the adapter still sees the same parameters
    engine.compute(model.task_losses(x, torch.ones(2, 3)))
    assert torch.isfinite(engine.grads).all()


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_at_w_plus_delta_equals_the_applied_weights_and_the_merge(method: str) -> None:
    model = small_model()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 3))
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    adapter.reset()
    opt = torch.optim.Adam(adapter.adapter_parameters, lr=0.05)
    name_of = {id(p): name for name, p in model.named_parameters()}
    for _ in range(5):
        opt.zero_grad()
        effective = {name_of[id(w)]: w + d for w, d in zip(adapter.adapted_weights, adapter.deltas())}
        losses = losses_at(model, lambda m, b: m.task_losses(*b), (x, y), effective)
        losses.sum().backward(inputs=adapter.adapter_parameters)  # autograd reaches the factors through ΔW
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.adapter_parameters)
    with torch.no_grad():
        functional = forward_at(model, adapter, x)
        with adapter.applied(adapter.deltas()):
            in_place = model(x)
    torch.testing.assert_close(functional, in_place)
    base_before = [p.detach().clone() for p in adapter.base_parameters]
    deltas = adapter.merge()
    torch.testing.assert_close(model(x), functional, rtol=1e-4, atol=1e-5)  # the adapter is now inside W
    assert any(d.abs().sum() > 0 for d in deltas)
    for p, b, d in zip(adapter.base_parameters, base_before, deltas):
        torch.testing.assert_close(p.detach(), b + d)


@pytest.mark.parametrize("method", METHODS)
def test_the_scale_is_alpha_over_rank_as_set(method: str) -> None:
    model = small_model()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    randomize(adapter)
    with pytest.raises(RuntimeError, match="alpha is not set"):  # the scale comes from the semantics
        adapter.deltas()
    deltas = {}
    for alpha in (2.0, 6.0):
        adapter.set_alpha(alpha)
        deltas[alpha] = adapter.deltas()
    for small, large in zip(deltas[2.0], deltas[6.0]):
        torch.testing.assert_close(large, 3 * small)  # ΔW is linear in the scale alpha / rank
    with pytest.raises(ValueError, match="alpha"):
        adapter.set_alpha(0.0)


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact(method: str) -> None:
    model = small_model()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    snap = adapter.snapshot()
    randomize(adapter)
    adapter.merge()
    assert any(not torch.equal(p, s) for p, s in zip(adapter.adapted_weights, snap))
    adapter.restore(snap)
    assert all(torch.equal(p, s) for p, s in zip(adapter.adapted_weights, snap))
    with pytest.raises(ValueError, match="snapshot has"):
        adapter.restore(snap[:-1])
    with pytest.raises(RuntimeError), adapter.applied(adapter.deltas()):
        raise RuntimeError("a failing pass")
    assert all(torch.equal(p, s) for p, s in zip(adapter.adapted_weights, snap))  # also on error


def test_reset_draws_from_the_adapters_generator_only() -> None:
    factors = []
    for _ in range(2):
        model = small_model()
        adapter = TeleportAdapter(model.backbone, rank=2, generator=torch.Generator().manual_seed(7))
        rng = torch.get_rng_state()
        adapter.reset()
        assert torch.equal(torch.get_rng_state(), rng)
        factors.append([p.detach().clone() for p in adapter.adapter_parameters])
    assert all(torch.equal(a, b) for a, b in zip(*factors))  # same generator state, same factors
    drawn = [p for p in factors[0] if p.abs().sum() > 0]
    assert len(drawn) == 9 and all(p.abs().max() <= 1 / p.shape[1] ** 0.5 for p in drawn)  # A, B = 0


def test_frozen_layers_are_not_adapted_and_never_change() -> None:
    backbone = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    backbone[2].requires_grad_(False)
    frozen = backbone[2].weight.detach().clone()
    adapter = TeleportAdapter(backbone, rank=2)
    adapter.set_alpha(ALPHA)
    assert adapter.names == ["0", "4"] and all(w is not backbone[2].weight for w in adapter.adapted_weights)
    randomize(adapter)
    adapter.merge()
    assert torch.equal(backbone[2].weight, frozen)
    assert not backbone[2].weight.requires_grad and backbone[0].weight.requires_grad


def test_bad_backbones() -> None:
    with pytest.raises(ValueError, match="no trainable Linear or Conv"):
        TeleportAdapter(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="all of them are frozen"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)).requires_grad_(False))
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="registered twice"):
        TeleportAdapter(nn.Sequential(shared, nn.ReLU(), shared))
    with pytest.raises(ValueError, match="OFT is not supported"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), method="oft")
    with pytest.raises(ValueError, match="rank"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), rank=0)
    single = nn.Linear(3, 2)  # a backbone that is one layer is adapted like any other
    adapter = TeleportAdapter(single, rank=1)
    assert adapter.names == [""] and adapter.adapted_weights == [single.weight]
