"""The teleport adapter: injected once, invisible when disabled, merged exactly, restored bit-exactly."""

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


@pytest.mark.parametrize("method", METHODS)
def test_injection_keeps_parameters_and_output(method: str) -> None:
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    params = list(model.backbone.parameters())
    engine = TaskGradients(params, num_tasks=3)
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    assert adapter.base_parameters == params and all(p.requires_grad for p in params)
    assert len(adapter.layers) == 9  # 7 convs + 2 linears
    assert not any(p.requires_grad for p in adapter.adapter_parameters)
    torch.testing.assert_close(model(x), before)
    # the engine built before injection still sees the same parameters
    engine.compute(model.task_losses(x, torch.ones(2, 3)))
    assert torch.isfinite(engine.grads).all()


@pytest.mark.parametrize("method", METHODS)
def test_trained_adapter_merges_exactly_and_resets_to_identity(method: str) -> None:
    model = small_model()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 3))
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    adapter.set_enabled(True)
    opt = torch.optim.Adam(adapter.adapter_parameters, lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        model.task_losses(x, y).sum().backward()
        opt.step()
    with torch.no_grad():
        with_adapter = model(x)
    base_before = adapter.snapshot()
    deltas = adapter.merge_and_reset()
    torch.testing.assert_close(model(x), with_adapter, rtol=1e-4, atol=1e-5)  # the adapter is now inside W
    assert any(d.abs().sum() > 0 for d in deltas)
    for p, b, d in zip(adapter.base_parameters, base_before, deltas):
        torch.testing.assert_close(p.detach(), b + d)
    adapter.set_enabled(False)
    torch.testing.assert_close(model(x), with_adapter, rtol=1e-4, atol=1e-5)  # disabled: same function


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact(method: str) -> None:
    model = small_model()
    adapter = TeleportAdapter(model.backbone, rank=2, method=method)
    snap = adapter.snapshot()
    with torch.no_grad():
        for p in adapter.adapter_parameters:
            p.normal_()
    adapter.merge_and_reset()
    assert any(not torch.equal(p, s) for p, s in zip(adapter.base_parameters, snap))
    adapter.restore(snap)
    assert all(torch.equal(p, s) for p, s in zip(adapter.base_parameters, snap))
    with pytest.raises(ValueError, match="snapshot has"):
        adapter.restore(snap[:-1])


def test_bad_backbones() -> None:
    with pytest.raises(ValueError, match="no Linear or Conv"):
        TeleportAdapter(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="wrap it"):
        TeleportAdapter(nn.Linear(3, 3))
    backbone = nn.Sequential(nn.Linear(3, 3))
    TeleportAdapter(backbone)
    with pytest.raises(ValueError, match="already holds LoRA"):
        TeleportAdapter(backbone)
    with pytest.raises(ValueError, match="OFT is not supported"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), method="oft")
    with pytest.raises(ValueError, match="rank"):
        TeleportAdapter(nn.Sequential(nn.Linear(3, 3)), rank=0)
