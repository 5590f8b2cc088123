"""The representation-gradient mode (MGDA-UB, LibMTL's rep_grad): Z holds ∂L_i/∂z, the update
J_zᵀ Zᵀ w is exactly Gᵀw for the same weights, and COST trains with it for every kind of method."""

from __future__ import annotations

import pytest
import torch

from cost_fast import COST, TaskGradients, TeleportConfig, get_aggregator
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


@pytest.mark.parametrize("name", ["mgda", "fairgrad", "graddrop", "uw"])
def test_cost_trains_in_representation_mode(name: str) -> None:
    model, x, y = problem(1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    base = get_aggregator(name, num_tasks=K) if name == "uw" else get_aggregator(name)
    params = list(model.parameters()) + (list(base.parameters()) if name == "uw" else [])
    cost = COST(
        model,
        model.backbone,
        base,
        torch.optim.Adam(params, lr=3e-2),
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        steps_per_epoch=4,
        gradient_mode="representation",
        teleport=TeleportConfig(rounds=1),
    )
    first = float(model.task_losses(x, y).sum().detach())
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 5]
    assert all(i.skipped is None for i in infos)
    assert float(model.task_losses(x, y).sum().detach()) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())
