"""The representation-gradient mode (MGDA-UB, LibMTL's rep_grad): Z holds ∂L_i/∂z, the update
J_zᵀ Zᵀ w is exactly Gᵀw for the same weights, and COST trains and teleports with it for every
kind of method, its trigger reading the conflicts of Z."""

from __future__ import annotations

import pytest
import torch
from tug import Tug, tug_batches

from cost_fast import COST, BaseStepConfig, TaskGradients, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.grads import RepresentationGradients
from cost_fast.models import MultiTaskMLP, batch_task_losses, conflicting_binary_tasks

K = 4


def problem(seed: int = 0):
    torch.manual_seed(seed)
    x, y = conflicting_binary_tasks(64, in_features=8, num_tasks=K, seed=seed)
    return MultiTaskMLP(8, K, hidden=6).double(), x.double(), y.double()


def test_rows_are_representation_gradients_and_the_update_is_exact() -> None:
    model, x, y = problem()
    engine = RepresentationGradients(model.backbone, model.backbone.parameters())
    exact = TaskGradients(model.backbone.parameters(), num_tasks=K)
    z = model.backbone(x)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat([h(z) for h in model.heads], dim=1), y, reduction="none"
    ).mean(0)
    Z = engine.compute(losses)
    assert Z.shape == (K, z.numel()) and engine.num_tasks == K
    for i in range(K):
        (g,) = torch.autograd.grad(losses[i], z, retain_graph=True)
        torch.testing.assert_close(Z[i], g.reshape(-1))
    G = exact.compute(losses, retain_graph=True)
    w = torch.tensor([0.1, 0.7, -0.2, 0.4], dtype=torch.float64)
    torch.testing.assert_close(engine.combine(w, write_grad=False), G.T @ w, rtol=1e-12, atol=1e-14)
    engine.combine(w)
    offset = 0
    for p in model.backbone.parameters():
        torch.testing.assert_close(p.grad.reshape(-1), (G.T @ w)[offset : offset + p.numel()])
        offset += p.numel()


def test_compute_needs_a_forward_pass_with_grad() -> None:
    model, x, y = problem()
    engine = RepresentationGradients(model.backbone, model.backbone.parameters())
    with torch.no_grad():
        losses = model.task_losses(x, y)
    with pytest.raises(ValueError, match="no representation"):
        engine.compute(losses.requires_grad_())


def tug_losses_from(model: Tug, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``Tug.task_losses`` from the backbone's output z (the same formula)."""
    out = torch.cat([head(z) for head in model.heads], dim=1)
    return ((out - targets) ** 2).mean(dim=0) + (z.sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


@pytest.mark.parametrize("name", ["mgda", "fairgrad", "graddrop", "uw"])
def test_cost_trains_and_teleports_in_representation_mode(name: str) -> None:
    torch.manual_seed(1)
    model = Tug().double()
    batches = tug_batches(1, 4, torch.float64)
    base = get_aggregator(name, num_tasks=K) if name == "uw" else get_aggregator(name)
    params = list(model.parameters()) + (list(base.parameters()) if name == "uw" else [])
    cost = COST(
        model,
        model.backbone,
        base,
        torch.optim.Adam(params, lr=1e-2),
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        schedule=TeleportSchedule(start_step=1, steps_per_epoch=4),
        base_step=BaseStepConfig(gradient_mode="representation"),
        teleport=TeleportConfig(rounds=1),
    )
    first = sum(float(batch_task_losses(model, b).sum().detach()) for b in batches)
    infos = []
    for batch in batches * 5:
        x, targets = batch
        z = model.backbone(x)  # the last forward before the step: the one COST's engine captures
        losses = tug_losses_from(model, z, targets)
        # the trigger reads the conflicts of Z = ∂L/∂z, the representation's gradients
        Z = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses])
        expected = torch.nn.functional.cosine_similarity(Z, Z.mean(0, keepdim=True)).min()
        before = [p.detach().clone() for p in model.backbone.parameters()]
        info = cost.step(losses, batch)
        assert info.min_cos_mean == pytest.approx(float(expected), abs=1e-6)
        assert info.trigger == (float(expected) <= 0)  # the public trigger: min_i cos(z_i, z0) ≤ 0
        if info.teleported:  # a merged teleport moved the backbone and took no base step
            assert any(not torch.equal(p, b) for p, b in zip(model.backbone.parameters(), before))
            assert info.teleport_steps == 2
        infos.append(info)
    assert all(i.skipped is None for i in infos)
    assert sum(i.teleported for i in infos) >= 3  # one per epoch in which the trigger fired
    assert max(sum(i.attempted_teleport for i in infos[e * 4 : e * 4 + 4]) for e in range(5)) == 1
    assert sum(float(batch_task_losses(model, b).sum().detach()) for b in batches) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())
