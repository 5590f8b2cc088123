"""cost_fast.step: COST's ordinary step is each method's own step (every registered name, step for
step, against the method's own training loop), with one policy for non-finite values (every
registered name): a skipped step changes nothing, or raises."""

from __future__ import annotations

import copy

import pytest
import torch
from tug import K, assert_same_state, build, make_cost, make_method, mlp_setup

from cost_fast import BaseStepConfig, TaskGradients, TeleportSchedule, gram_stats, list_aggregators
from cost_fast.aggregators.base import GradientAggregator
from cost_fast.models import batch_task_losses
from cost_fast.update import NONFINITE_GRADIENT_METHOD_UPDATE

OFF = TeleportSchedule(max_per_epoch=0)

# -- every base method under COST as alone ---------------------------------------------------


def own_training_loop(name: str, model, batches, epochs: int):
    """The method's own loop, written from its documented API (no COST)."""
    method = make_method(name)
    kind = list_aggregators()[name]
    params = list(model.parameters()) + (list(method.parameters()) if kind == "loss" else [])
    opt = torch.optim.Adam(params, lr=1e-2)
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    engine = TaskGradients(shared, num_tasks=K)
    trajectory = []
    for _ in range(epochs):
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            losses = batch_task_losses(model, batch)
            if kind == "gram":
                w = method.weights(gram_stats(engine.compute(losses, retain_graph=True)).gram)
                (losses @ w.to(losses)).backward(inputs=heads)
                engine.combine(w)
            elif kind == "grads":
                d = method.aggregate(engine.compute(losses, retain_graph=True))
                losses.sum().backward(inputs=heads)
                engine.write_update(d.to(engine.grads.dtype))
            else:
                norms = torch.stack(
                    [
                        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]).norm()
                        for loss in losses
                    ]
                )
                method(losses).backward()
            opt.step()
            if name in ("dwa", "stch"):
                method.update(losses)
            elif name == "famo":
                with torch.no_grad():
                    method.update(batch_task_losses(model, batch))
            elif name == "gradnorm":
                method.update(losses, norms)
            trajectory.append([p.detach().clone() for p in model.parameters()])
        if name == "dwa":
            method.end_epoch()
    return trajectory, method


@pytest.mark.parametrize("name", sorted(list_aggregators()))
def test_every_method_under_cost_without_teleports_equals_its_own_loop(name: str) -> None:
    epochs = 3  # DWA changes its weights from the third epoch on
    model, batches = mlp_setup(3, torch.float64)
    alone = copy.deepcopy(model)
    cost, _ = make_cost(model, batches, name, schedule=OFF, teleport_data=batches)
    trajectory = []
    for _ in range(epochs):
        for batch in batches:
            info = cost.step(batch_task_losses(model, batch), batch)
            assert info.skipped is None and not info.attempted_teleport
            trajectory.append([p.detach().clone() for p in model.parameters()])
    expected, method = own_training_loop(name, alone, batches, epochs)
    for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}, step {step}")
    assert cost.epoch == epochs
    assert_same_state(cost.base.state_dict(), method.state_dict(), name)
    if name in ("uw", "imtl_l"):  # learned parameters did learn
        assert any(float(p.detach().abs().sum()) > 0 for p in cost.base.parameters())


# -- one policy for non-finite values ---------------------------------------------------------


def poisoned(kind: str):
    """A loss_fn whose losses (kind "losses") or whose first head's gradient alone (kind "head",
    via 0·sqrt(0): value 0, gradient NaN) are not finite."""

    def loss_fn(model, batch):
        losses = batch_task_losses(model, batch)
        if kind == "losses":
            return losses * torch.tensor([1.0, float("nan"), 1.0, 1.0])
        w = model.heads[0].weight
        return losses + torch.stack([0 * (w - w.detach()).abs().sqrt().sum(), *[losses[0] * 0] * (K - 1)])

    return loss_fn


@pytest.mark.parametrize("kind", ["losses", "head"])
@pytest.mark.parametrize("name", sorted(list_aggregators()))
def test_a_non_finite_step_changes_nothing_for_every_method(name: str, kind: str) -> None:
    model, batches = mlp_setup(5)
    cost, opt = make_cost(model, batches, name, schedule=OFF, teleport_data=batches)
    for batch in batches[:2]:  # some history first: optimizer moments, method state
        cost.step(batch_task_losses(model, batch), batch)
    before = (
        copy.deepcopy(list(model.state_dict().values())),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(cost.base.state_dict()),
    )
    batch = batches[2]
    info = cost.step(poisoned(kind)(model, batch), batch)
    assert info.skipped is not None and ("non-finite" in info.skipped)
    after = (list(model.state_dict().values()), opt.state_dict(), cost.base.state_dict())
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b), f"{name}: a parameter changed"
    assert_same_state(before[1], after[1], f"{name} optimizer")
    if kind == "head" and getattr(cost.base, "state_like_gradients", False):
        # a state as large as G is not copied: the refused step moved it, by its finite G
        assert info.skipped == NONFINITE_GRADIENT_METHOD_UPDATE
    else:
        assert_same_state(before[2], after[2], f"{name} method state")
    assert all(p.grad is None for p in model.parameters())
    # the next finite step trains as usual
    info = cost.step(batch_task_losses(model, batch), batch)
    assert info.skipped is None


def test_nonfinite_raise_option() -> None:
    model, batches = mlp_setup(6)
    cost, _ = make_cost(
        model,
        batches,
        "mgda",
        schedule=OFF,
        base_step=BaseStepConfig(nonfinite="raise"),
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        cost.step(poisoned("losses")(model, batches[0]), batches[0])
    with pytest.raises(FloatingPointError, match="head gradients"):
        cost.step(poisoned("head")(model, batches[0]), batches[0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert cost.step_count == 0
    with pytest.raises(ValueError, match="nonfinite"):
        make_cost(
            model,
            batches,
            base_step=BaseStepConfig(nonfinite="ignore"),
        )


class OverflowingGradientMethod(GradientAggregator):
    """A gradient method whose update overflows from finite gradients at its second call."""

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        d = G.float().sum(dim=0)
        return d * float("inf") if self.calls == 2 else d

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class LargeStateOverflowingMethod(OverflowingGradientMethod):
    state_like_gradients = True  # not copied: its state takes a refused step


@pytest.mark.parametrize("large_state", [False, True])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_gradient_methods_non_finite_update_leaves_parameters_and_optimizer(policy: str, large_state: bool) -> None:
    model, batches = mlp_setup(7)
    method = LargeStateOverflowingMethod() if large_state else OverflowingGradientMethod()
    cost, opt = make_cost(model, batches, method, schedule=OFF, base_step=BaseStepConfig(nonfinite=policy))
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    params, moments = copy.deepcopy(list(model.state_dict().values())), copy.deepcopy(opt.state_dict())
    if policy == "raise":
        unchanged = "the parameters and the optimizer were not changed" if large_state else "nothing was changed"
        with pytest.raises(FloatingPointError, match=unchanged):
            cost.step(batch_task_losses(model, batches[1]), batches[1])
    else:
        info = cost.step(batch_task_losses(model, batches[1]), batches[1])
        assert info.skipped is not None and ("gradient method" in info.skipped) == large_state
    assert all(torch.equal(a, b) for a, b in zip(params, model.state_dict().values(), strict=True))
    assert_same_state(moments, opt.state_dict(), "optimizer")
    assert all(p.grad is None for p in model.parameters())
    if not large_state:
        assert cost.base.calls == 1  # its state was put back: the next step repeats the overflow
        return
    assert cost.base.calls == 2  # its state has taken the step, as documented
    info = cost.step(batch_task_losses(model, batches[2]), batches[2])
    assert info.skipped is None and all(torch.isfinite(p).all() for p in model.parameters())


# -- around the optimizer step ---------------------------------------------------------------


def test_the_public_codes_clipping_applies_to_the_callers_optimizer_step_too() -> None:
    """``BaseStepConfig.public_code()`` clips the shared parameters' gradient to norm 1 right
    before the optimizer step (its ``clip_grad_norm_(shared, 1.0)``), heads unclipped."""
    model, batches, cost, opt = build("mgda", base_step=BaseStepConfig.public_code())
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    opt.zero_grad()
    cost.backward(batch_task_losses(model, batches[0]), batches[0])
    unclipped = [p.grad.clone() for p in model.parameters()]
    opt.step()
    shared = len(list(model.backbone.parameters()))
    norm = torch.stack([g.norm() for g in seen[0][:shared]]).norm()
    assert torch.stack([g.norm() for g in unclipped[:shared]]).norm() > 1  # the clip binds
    torch.testing.assert_close(norm, torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)  # torch's eps
    assert all(torch.equal(a, b) for a, b in zip(seen[0][shared:], unclipped[shared:]))  # heads as they were
