"""The public COST code's choices, each pinned against a straightforward version of what that code
does: the LoRA scale and merged delta (peft's own ``get_peft_model(...).merge_and_unload()`` with
its defaults), its base step (unweighted heads, K·Gᵀw, gradients clipped to norm 1, FairGrad
α = 2), the base step right after a teleport (its CityScapes trainer), and its choice of adapted
layers."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tug import Tug, tug_batches

from cost_fast import (
    COST,
    AdapterConfig,
    BaseStepConfig,
    PublicSemantics,
    TeleportConfig,
    TeleportSchedule,
    get_aggregator,
)
from cost_fast.models import MultiTaskMLP, batch_task_losses, conflicting_binary_tasks
from cost_fast.teleport.lora import TeleportAdapter

K = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def test_lora_scale_and_merged_delta_equal_peft_with_the_public_defaults() -> None:
    torch.manual_seed(0)
    net = Net()
    straightforward = copy.deepcopy(net)
    semantics = PublicSemantics()
    assert LoraConfig(r=5).lora_alpha == semantics.lora_alpha  # peft's default, which the public code keeps
    adapter = TeleportAdapter(net.backbone, rank=5)
    adapter.set_alpha(semantics.lora_alpha)  # what teleport() does
    adapter.reset()
    with torch.no_grad():
        for b in adapter.adapter_parameters[1::2]:  # (A, B) per layer: B away from 0
            b.normal_()
    factors = [(a.detach().clone(), b.detach().clone()) for a, b in zip(*[iter(adapter.adapter_parameters)] * 2)]
    deltas = adapter.merge()
    wrapped = get_peft_model(straightforward, LoraConfig(r=5, target_modules=["backbone.0", "backbone.2"]))
    with torch.no_grad():
        peft_layers = [m for name, m in wrapped.named_modules() if name.endswith(("backbone.0", "backbone.2"))]
        for layer, (a, b) in zip(peft_layers, factors, strict=True):
            layer.lora_A["default"].weight.copy_(a.view_as(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.copy_(b.view_as(layer.lora_B["default"].weight))
    merged = wrapped.merge_and_unload()
    for ours, theirs in zip(net.backbone.parameters(), merged.backbone.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    a, b = factors[0]
    torch.testing.assert_close(deltas[0], (8 / 5) * b @ a)  # the scale alpha/r = 1.6


def problem(seed: int = 0):
    torch.manual_seed(seed)
    x, y = conflicting_binary_tasks(64, in_features=8, num_tasks=K, seed=seed)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return MultiTaskMLP(8, K, hidden=8).double(), [(bx.double(), by.double()) for bx, by in batches]


def tug(seed: int = 0):
    torch.manual_seed(seed)
    return Tug(), tug_batches(seed, 4)


def test_public_base_step_equals_the_public_codes_step() -> None:
    model, batches = problem(1)
    plain = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad", alpha=2.0),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches,
        schedule=TeleportSchedule(max_per_epoch=0),
        base_step=BaseStepConfig.public_code(),
    )
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    fairgrad = get_aggregator("fairgrad", alpha=2.0)
    shared = list(plain.backbone.parameters())
    for batch in batches * 2:
        cost.step(batch_task_losses(model, batch), batch)
        # the public trainer: per-task gradients of the shared part, FairGrad weights, the
        # backbone gets K·Gᵀw, each head its own unweighted gradient, then the shared part's
        # gradient clipped to norm 1 (its clip_grad_norm_(shared, max_norm=1.0): heads unclipped)
        opt.zero_grad()
        losses = batch_task_losses(plain, batch)
        G = torch.stack(
            [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)]) for l in losses]
        )
        w = fairgrad.weights(G @ G.T)
        update = K * (G.T @ w)
        losses.sum().backward(inputs=list(plain.heads.parameters()))
        offset = 0
        for p in shared:
            p.grad = update[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        torch.nn.utils.clip_grad_norm_(shared, 1.0)
        opt.step()
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("step_after_teleport", [False, True])
def test_a_base_step_at_the_teleported_point(step_after_teleport: bool) -> None:
    model, batches = tug(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        schedule=TeleportSchedule(steps_per_epoch=4),
        teleport=TeleportConfig(rounds=1),
        base_step=BaseStepConfig(step_after_teleport=step_after_teleport),
    )
    for batch in batches * 2:
        heads = [p.detach().clone() for p in model.heads.parameters()]
        info = cost.step(batch_task_losses(model, batch), batch)
        if info.attempted_teleport:
            break
    assert info.teleported and info.stepped_after_teleport == step_after_teleport
    moved = any(not torch.equal(p, h) for p, h in zip(model.heads.parameters(), heads))
    assert moved == step_after_teleport  # the heads move only with a base step
    if info.htr == "modulated":  # HTR applies to that base step, or waits for the next one
        assert (cost.htr.pending_sigma is None) == step_after_teleport
    else:  # a fresh Adam, which only that base step fills again
        assert info.htr == "reset" and (len(optimizer.state) > 0) == step_after_teleport


def test_adapter_targets_choose_the_adapted_layers() -> None:
    model, batches = tug(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        adapter=AdapterConfig(targets=lambda name, layer: name == "2"),  # the second Linear only
        teleport=TeleportConfig(rounds=1),
    )
    assert cost.adapter.names == ["2"]
    for batch in batches * 2:
        first = model.backbone[0].weight.detach().clone()
        info = cost.step(batch_task_losses(model, batch), batch)
        if info.teleported:
            break
    assert info.teleported and torch.equal(model.backbone[0].weight, first)
    with pytest.raises(ValueError, match="targets chose none"):
        TeleportAdapter(nn.Sequential(nn.Linear(2, 2)), targets=lambda name, layer: False)
    with pytest.raises(ValueError, match="head_gradients"):
        BaseStepConfig(head_gradients="mean")
