"""Group-action teleportation (Zhao et al.) by hidden-unit rescaling: the losses are unchanged to
1e-10 in float64, the gradient norm rises, the conflict statistics are reported before and after,
frozen layers are never rescaled, and COST uses it in place of the adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cost_fast import COST, RescaleConfig, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.models import batch_task_losses
from cost_fast.teleport.rescaling import RescalingTeleport, rescalable_pairs

K = 3


class MLP(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 7), activation, nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(K))

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        return torch.cat([((head(h) - y[:, i : i + 1]) ** 2).mean(0) for i, head in enumerate(self.heads)])


def problem(activation: nn.Module, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP(activation).double()
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(16, K, generator=gen, dtype=torch.float64))
        for _ in range(3)
    ]
    return model, batches


def grad_norm(model, batch) -> float:
    loss = batch_task_losses(model, batch).mean()
    grads = torch.autograd.grad(loss, [p for p in model.backbone.parameters()])
    return float(sum((g * g).sum() for g in grads).sqrt())


@pytest.mark.parametrize(
    "activation", [nn.LeakyReLU(0.1), nn.ReLU(), nn.Identity()], ids=["leaky_relu", "relu", "linear"]
)
def test_the_losses_are_unchanged_and_the_gradient_norm_rises(activation: nn.Module) -> None:
    model, batches = problem(activation)
    assert len(rescalable_pairs(model.backbone)) == 2
    before = [batch_task_losses(model, b).detach() for b in batches]
    norm_before = grad_norm(model, batches[0])
    result = RescalingTeleport(model, model.backbone, RescaleConfig(steps=20, lr=0.5)).teleport(
        batch_task_losses, batches[0]
    )
    for b, loss in zip(batches, before):  # every batch, not only the teleport's
        torch.testing.assert_close(batch_task_losses(model, b).detach(), loss, rtol=1e-10, atol=1e-12)
    assert any(float(d.abs().max()) > 1e-3 for d in result.deltas)  # it did move the weights
    assert grad_norm(model, batches[0]) > 1.01 * norm_before
    assert result.objective[-1] > result.objective[0]
    for stats in (result.conflicts_before, result.conflicts_after):
        assert set(stats) == {"min_cos_mean", "conflicting_pairs", "mean_norm"} and -1 <= stats["min_cos_mean"] <= 1


def test_frozen_layers_are_never_rescaled_and_bad_backbones_are_refused() -> None:
    model, batches = problem(nn.ReLU())
    model.backbone[4].requires_grad_(False)
    frozen = model.backbone[4].weight.detach().clone()
    teleporter = RescalingTeleport(model, model.backbone, RescaleConfig(steps=5))
    assert len(teleporter.pairs) == 1  # only Linear 0 -> Linear 2 is left
    teleporter.teleport(batch_task_losses, batches[0])
    assert torch.equal(model.backbone[4].weight, frozen)
    with pytest.raises(ValueError, match="two trainable nn.Linear"):
        RescalingTeleport(model, nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)))


def test_cost_teleports_by_rescaling_with_htr() -> None:
    model, batches = problem(nn.LeakyReLU(0.1), seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches,
        adapter="rescale",
        schedule=TeleportSchedule(steps_per_epoch=1),
        teleport=TeleportConfig(guard=True),
    )
    assert cost.adapter is None and not any("lora" in k for k in model.state_dict())
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 3]
    teleports = [i for i in infos if i.attempted_teleport]
    assert teleports and all(i.teleported for i in teleports)  # exact invariance: the guard never rolls back
    assert all(i.level_set_error < 1e-10 and i.merged_fraction == 1 for i in teleports)  # float64 rounding
    assert all(i.symmetry["objective"][-1] >= i.symmetry["objective"][0] for i in teleports)
    assert any(i.htr in ("modulated", "reset") for i in teleports)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def shared_layer(model: MLP) -> None:
    model.backbone[2] = nn.Linear(7, 7).double()
    model.backbone[4] = model.backbone[2]  # one Linear in two places
    model.heads = nn.ModuleList(nn.Linear(7, 1).double() for _ in range(K))


def tied_weights(model: MLP) -> None:
    model.backbone[2] = nn.Linear(7, 7).double()
    model.backbone[4] = nn.Linear(7, 7).double()
    model.backbone[4].weight = model.backbone[2].weight
    model.heads = nn.ModuleList(nn.Linear(7, 1).double() for _ in range(K))


def old_weight_norm(model: MLP) -> None:
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model.backbone[0])


def parametrized_weight_norm(model: MLP) -> None:
    torch.nn.utils.parametrizations.weight_norm(model.backbone[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (shared_layer, "appear once each"),
        (tied_weights, "appear once each"),
        (old_weight_norm, "parametrized"),
        (parametrized_weight_norm, "parametrized"),
    ],
)
def test_layers_the_rescaling_would_corrupt_are_refused_before_any_change(change, message: str) -> None:
    model, batches = problem(nn.ReLU())
    change(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        RescalingTeleport(model, model.backbone)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=message):
        COST(
            model,
            model.backbone,
            get_aggregator("mean"),
            optimizer,
            loss_fn=batch_task_losses,
            teleport_data=batches,
            adapter="rescale",
        )
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_leaf for p in model.parameters())
