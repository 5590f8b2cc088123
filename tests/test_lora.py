"""The teleport adapter: attached only during a teleport (the model's checkpoint keys never change),
frozen layers never adapted, merged exactly, restored bit-exactly, torch's global generator untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cost_fast import TaskGradients
from cost_fast.lora import TeleportAdapter
from cost_fast.models import CelebACNN


def small_model(seed: int = 0) -> CelebACNN:
    torch.manual_seed(seed)
    return CelebACNN(num_tasks=3, width=2).eval()


METHODS = ["lora", "loha"]
ALPHA = 3.0


@pytest.mark.parametrize("method", METHODS)
def test_the_scale_is_alpha_over_rank_as_set(method: str) -> None:
    model = small_model()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    with torch.no_grad():
        for p in adapter.adapter_parameters:
            p.normal_()
    deltas = {}
    for alpha in (2.0, 6.0):
        adapter.set_alpha(alpha)
        snap = adapter.snapshot()
        deltas[alpha] = adapter.merge()
        adapter.restore(snap)
    for small, large in zip(deltas[2.0], deltas[6.0]):
        torch.testing.assert_close(large, 3 * small)  # ΔW is linear in the scale alpha / rank
    with pytest.raises(ValueError, match="alpha"):
        adapter.set_alpha(0.0)


@pytest.mark.parametrize("method", METHODS)
def test_building_the_adapter_leaves_the_model_as_it_was(method: str) -> None:
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    keys = list(model.state_dict())
    modules = [type(m) for m in model.modules()]
    params = list(model.backbone.parameters())
    engine = TaskGradients(params, num_tasks=3)
    rng = torch.get_rng_state()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    assert torch.equal(torch.get_rng_state(), rng)  # peft's initialization drew from a forked generator
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == modules
    assert not hasattr(model.backbone, "peft_config")
    assert adapter.base_parameters == params and all(p.requires_grad for p in params)
    assert len(adapter.layers) == 9  # 7 convs + 2 linears
    torch.testing.assert_close(model(x), before)
    fresh = CelebACNN(num_tasks=3, width=2)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with adapter.attached():
        assert len(list(model.state_dict())) > len(keys)
        adapter.reset()
        torch.testing.assert_close(model(x), before)  # the reset adapter is the identity
    assert list(model.state_dict()) == keys
    # the engine built before the adapter still sees the same parameters
    engine.compute(model.task_losses(x, torch.ones(2, 3)))
    assert torch.isfinite(engine.grads).all()


@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_merges_exactly(method: str) -> None:
    model = small_model()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 3))
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    with adapter.attached():
        adapter.reset()
        opt = torch.optim.Adam(adapter.adapter_parameters, lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            model.task_losses(x, y).sum().backward(inputs=adapter.adapter_parameters)
            opt.step()
        with torch.no_grad():
            with_adapter = model(x)
        base_before = [p.detach().clone() for p in adapter.base_parameters]
        deltas = adapter.merge()
    torch.testing.assert_close(model(x), with_adapter, rtol=1e-4, atol=1e-5)  # the adapter is now inside W
    assert any(d.abs().sum() > 0 for d in deltas)
    for p, b, d in zip(adapter.base_parameters, base_before, deltas):
        torch.testing.assert_close(p.detach(), b + d)


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact(method: str) -> None:
    model = small_model()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_alpha(ALPHA)
    snap = adapter.snapshot()
    with torch.no_grad():
        for p in adapter.adapter_parameters:
            p.normal_()
    adapter.merge()
    assert any(not torch.equal(p, s) for p, s in zip(adapter.adapted_weights, snap))
    adapter.restore(snap)
    assert all(torch.equal(p, s) for p, s in zip(adapter.adapted_weights, snap))
    with pytest.raises(ValueError, match="snapshot has"):
        adapter.restore(snap[:-1])


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
    a_factors = [p for p in factors[0] if p.abs().sum() > 0]
    assert a_factors and all(p.abs().max() <= 1 / p.shape[1] ** 0.5 for p in a_factors if p.ndim == 2)


def test_frozen_layers_are_not_adapted_and_never_change() -> None:
    backbone = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    backbone[2].requires_grad_(False)
    frozen = backbone[2].weight.detach().clone()
    adapter = TeleportAdapter(backbone, rank=2)
    adapter.set_alpha(ALPHA)
    assert len(adapter.layers) == 2 and all(w is not backbone[2].weight for w in adapter.adapted_weights)
    with torch.no_grad():
        for p in adapter.adapter_parameters:
            p.normal_()
    adapter.merge()
    assert torch.equal(backbone[2].weight, frozen)
    assert not backbone[2].weight.requires_grad and backbone[0].weight.requires_grad


def test_bad_backbones() -> None:
    with pytest.raises(ValueError, match="no trainable Linear or Conv"):
        TeleportAdapter(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="all of them are frozen"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)).requires_grad_(False))
    with pytest.raises(ValueError, match="wrap it"):
        TeleportAdapter(nn.Linear(3, 3))
    backbone = nn.Sequential(nn.Linear(3, 3))
    adapter = TeleportAdapter(backbone)
    with pytest.raises(RuntimeError, match="alpha is not set"):  # the scale comes from the semantics
        adapter.merge()
    with pytest.raises(RuntimeError, match="alpha is not set"):
        adapter.attached().__enter__()
    adapter.set_alpha(ALPHA)
    with adapter.attached(), pytest.raises(ValueError, match="already holds LoRA"):
        TeleportAdapter(backbone)
    with adapter.attached(), pytest.raises(RuntimeError, match="already attached"):
        with adapter.attached():
            pass
    with pytest.raises(ValueError, match="OFT is not supported"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), method="oft")
    with pytest.raises(ValueError, match="rank"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), rank=0)
