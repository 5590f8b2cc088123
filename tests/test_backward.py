"""mtl_backward: one call that leaves in .grad what the five-call step (or a plain loop) would."""

from __future__ import annotations

import copy

import pytest
import torch

from cost_fast import Aggregator, mtl_backward
from cost_fast.aggregators import MoCo
from cost_fast.methods import get_aggregator, list_aggregators
from cost_fast.models import MultiTaskMLP, batch_task_losses, conflicting_binary_tasks

K = 3


def _model_and_data(seed: int = 0) -> tuple[MultiTaskMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x, y = conflicting_binary_tasks(64, in_features=8, num_tasks=K)
    return MultiTaskMLP(8, num_tasks=K, hidden=16).double(), x.double(), y


def _plain_loop(model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor, weights_of) -> dict[str, torch.Tensor]:
    """θ.grad = Σ w_i ∇_θ L_i from K autograd calls; heads' grad = ∇ Σ w_i L_i."""
    losses = model.task_losses(x, y)
    shared = list(model.backbone.parameters())
    G = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], shared, retain_graph=True)]) for i in range(K)]
    )
    w = weights_of(G @ G.T)
    grads = {}
    offset = 0
    for name, p in model.backbone.named_parameters():
        grads[f"backbone.{name}"] = (G.T @ w)[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    head_params = dict(model.heads.named_parameters())
    for name, g in zip(head_params, torch.autograd.grad(losses @ w, list(head_params.values()))):
        grads[f"heads.{name}"] = g
    return grads


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("form", ["tensor", "list", "dict"])
def test_fills_grad_as_a_plain_loop_for_every_form_of_losses(form: str) -> None:
    model, x, y = _model_and_data()
    expected = _plain_loop(model, x, y, get_aggregator("nash_mtl").weights)
    losses = model.task_losses(x, y)
    given = {
        "tensor": losses,
        "list": [losses[i] for i in range(K)],
        "dict": {f"task{i}": losses[i] for i in range(K)},
    }[form]
    result = mtl_backward(given, model.backbone, get_aggregator("nash_mtl"))
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.losses, losses.detach())
    assert result.task_names == (("task0", "task1", "task2") if form == "dict" else None)
    torch.testing.assert_close(result.weights, get_aggregator("nash_mtl").weights(result.stats.gram))


def test_grad_accumulates_as_backward_does() -> None:
    model, x, y = _model_and_data()
    mtl_backward(model.task_losses(x, y), model.backbone, "mgda")
    once = _grads(model)
    mtl_backward(model.task_losses(x, y), model.backbone, "mgda")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name])


def test_a_plain_function_is_a_method() -> None:
    model, x, y = _model_and_data()
    result = mtl_backward(model.task_losses(x, y), model.backbone, lambda gram: torch.full((K,), 1.0 / K))
    by_function = _grads(model)
    model.zero_grad(set_to_none=True)
    mtl_backward(model.task_losses(x, y), model.backbone, "mean")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, by_function[name])
    assert result.weights.tolist() == pytest.approx([1 / K] * K)


def test_a_gradient_method_adds_its_own_direction_and_the_heads_get_the_sum() -> None:
    model, x, y = _model_and_data()
    reference, ours = MoCo(), MoCo()
    losses = model.task_losses(x, y)
    shared = list(model.backbone.parameters())
    G = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], shared, retain_graph=True)]) for i in range(K)]
    )
    d = reference.aggregate(G)
    head_grads = torch.autograd.grad(losses.sum(), list(model.heads.parameters()))
    result = mtl_backward(model.task_losses(x, y), model.backbone, ours)
    assert result.weights is None
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared]), d.to(G), rtol=1e-6, atol=1e-9)
    for p, g in zip(model.heads.parameters(), head_grads):
        torch.testing.assert_close(p.grad, g)


def test_a_loss_weighting_is_its_total_backward() -> None:
    """For a loss weighting Gᵀw with w = ∂total/∂L is ∇_θ total: the same .grad as total.backward(),
    its learned parameters included."""
    model, x, y = _model_and_data()
    uw = get_aggregator("uw", num_tasks=K).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2, 0.1]))
    uw(model.task_losses(x, y)).backward()
    expected = {**_grads(model), "log_vars": uw.log_vars.grad.clone()}
    model.zero_grad(set_to_none=True)
    uw.zero_grad(set_to_none=True)
    mtl_backward(model.task_losses(x, y), model.backbone, uw)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])
    torch.testing.assert_close(uw.log_vars.grad, expected["log_vars"])


def test_the_loss_scale_never_changes_the_result() -> None:
    """Nash-MTL's weights scale as 1/s with the gradients: solved on the unscaled statistics, the
    result is the scaled plain one."""
    model, x, y = _model_and_data()
    mtl_backward(model.task_losses(x, y), model.backbone, "nash_mtl")
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    result = mtl_backward(model.task_losses(x, y), model.backbone, "nash_mtl", scaler=scaler)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad / 1024.0, plain[name], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(result.weights, get_aggregator("nash_mtl").weights(result.stats.gram))


@pytest.mark.parametrize("name", ["mgda", "nash_mtl", "mean", "graddrop"])
def test_an_overflow_is_the_scalers_to_skip_and_training_goes_on(name: str) -> None:
    """As after a plain ``scaler.scale(loss).backward()``: the overflowing step puts NaN into
    .grad, the scaler skips it and halves its scale, and the next step trains; without a scaler
    the same step raises and changes no .grad."""
    model, x, y = _model_and_data(2)
    model.float()
    x = x.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    method = get_aggregator(name)

    def overflowing(losses: torch.Tensor) -> torch.Tensor:  # finite losses, a task gradient of 1e38 · s
        w = model.backbone[0].weight
        return losses + torch.stack([1e38 * (w - w.detach()).sum(), *[losses[0] * 0] * (K - 1)])

    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    result = mtl_backward(overflowing(model.task_losses(x, y)), model.backbone, method, scaler=scaler)
    assert result.skipped is not None and "GradScaler" in result.skipped
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**15  # the overflow lowered the scale
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the step was skipped
    optimizer.zero_grad()
    result = mtl_backward(model.task_losses(x, y), model.backbone, method, scaler=scaler)
    assert result.skipped is None
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # and training goes on
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(FloatingPointError, match="no .grad was changed"):
        mtl_backward(overflowing(model.task_losses(x, y)), model.backbone, method)
    assert all(p.grad is None for p in model.parameters())


def test_heads_given_explicitly_and_frozen_parameters_left_alone() -> None:
    model, x, y = _model_and_data()
    model.heads[0].bias.requires_grad_(False)
    mtl_backward(model.task_losses(x, y), model.backbone, "mean", heads=[model.heads[1].weight])
    assert model.heads[0].bias.grad is None and model.heads[0].weight.grad is None
    assert model.heads[1].weight.grad is not None and model.heads[1].bias.grad is None


@pytest.mark.parametrize(
    ("losses", "method", "error", "match"),
    [
        (lambda l: l.view(1, K), "mean", ValueError, "1-D tensor"),
        (lambda l: [], "mean", ValueError, "empty"),
        (lambda l: [l[:2], l[2]], "mean", ValueError, "loss 0 must be a scalar"),
        (lambda l: {0: l[0]}, "mean", TypeError, "strings"),
        (lambda l: l.detach(), "mean", ValueError, "no graph"),
        (lambda l: "loss", "mean", TypeError, "losses must be"),
        (lambda l: l, "pcgrad", ValueError, "keeps state"),
        (lambda l: l, "dwa", ValueError, r"get_aggregator\('dwa', num_tasks=3\)"),
        (lambda l: l, "no_such_method", ValueError, "unknown aggregator"),
        (lambda l: l, 3, TypeError, "method must be"),
        (lambda l: l, lambda gram: torch.ones(K + 1), ValueError, "must return a tensor of 3 weights"),
    ],
)
def test_bad_input_is_refused_before_any_grad_is_written(losses, method, error, match) -> None:
    model, x, y = _model_and_data()
    with pytest.raises(error, match=match):
        mtl_backward(losses(model.task_losses(x, y)), model.backbone, method)
    assert all(p.grad is None for p in model.parameters())


def test_heads_that_overlap_the_shared_parameters_are_refused() -> None:
    model, x, y = _model_and_data()
    with pytest.raises(ValueError, match="heads\\[0\\] is a shared parameter"):
        mtl_backward(model.task_losses(x, y), model.backbone, "mean", heads=[model.backbone[0].weight])


def test_a_weighting_built_for_another_number_of_tasks_is_refused() -> None:
    model, x, y = _model_and_data()
    with pytest.raises(ValueError, match="built for 2 tasks"):
        mtl_backward(model.task_losses(x, y), model.backbone, get_aggregator("gls", num_tasks=2))


# -- plug-in methods, alone and under COST ----------------------------------------------------


class InverseNorm(Aggregator):
    """A user's Gram method, written as the base class's docstring shows: w_i ∝ 1/‖g_i‖."""

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        inverse = gram.diagonal().clamp_min(1e-30).rsqrt()
        return inverse / inverse.sum()


def test_a_subclass_implements_solve_and_gets_the_checks_of_weights() -> None:
    gram = torch.tensor([[4.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(InverseNorm().weights(gram), torch.tensor([1 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="NaN or inf"):
        InverseNorm().weights(torch.full((2, 2), float("nan")))
    with pytest.raises(NotImplementedError, match="must implement solve"):
        Aggregator().weights(gram)


def _cost_run(base) -> list[torch.Tensor]:
    from cost_fast import COST, TeleportConfig
    from cost_fast.models import batch_task_losses

    torch.manual_seed(0)
    x, u = torch.randn(64, 8), torch.randn(8)
    # tasks 0/1 agree, 2/3 are their opposites: conflicts with the mean gradient, so COST teleports
    y = torch.stack([x @ u > 0, x @ u > 0.3, x @ u < 0, x @ u < -0.3], dim=1).float()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = MultiTaskMLP(8, num_tasks=4, hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        base,
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        teleport=TeleportConfig(rounds=1),
    )
    teleports = 0
    for _ in range(3):
        for batch in batches:
            teleports += cost.step(batch_task_losses(model, batch), batch).attempted_teleport
    assert teleports > 0  # the plug-in ran under teleports too
    return [p.detach().clone() for p in model.parameters()]


def test_plug_in_methods_under_cost_train_as_their_built_in_twin() -> None:
    """A function gram -> 1/K and the name "mean" give Mean's run bit for bit; a subclass runs."""
    mean = _cost_run(get_aggregator("mean"))
    for twin in (
        _cost_run(lambda gram: torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype)),
        _cost_run("mean"),
    ):
        for a, b in zip(mean, twin):
            assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in _cost_run(InverseNorm()))


def test_cost_says_how_to_build_a_loss_weighting_given_by_name() -> None:
    with pytest.raises(ValueError, match=r"get_aggregator\('uw', num_tasks=K\).*base.parameters\(\)"):
        _cost_run("uw")


def test_cost_keeps_the_task_names_of_a_dict_and_trains_as_with_a_tensor() -> None:
    from cost_fast import COST
    from cost_fast.models import batch_task_losses

    def run(named: bool) -> tuple[list[torch.Tensor], list]:
        model, x, y = _model_and_data()
        batches = [(x[:32], y[:32]), (x[32:], y[32:])]
        cost = COST(
            model,
            model.backbone,
            "mgda",
            torch.optim.Adam(model.parameters(), lr=1e-2),
            loss_fn=batch_task_losses,
            teleport_data=batches,
        )
        names = []
        for batch in batches * 2:
            losses = batch_task_losses(model, batch)
            info = cost.step({f"t{i}": losses[i] for i in range(K)} if named else losses, batch)
            names.append(info.task_names)
        return [p.detach().clone() for p in model.parameters()], names

    (plain, no_names), (named, names) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, named))
    assert names == [("t0", "t1", "t2")] * 4 and no_names == [None] * 4


@pytest.mark.parametrize("name", sorted(list_aggregators()))
def test_mtl_backward_and_costs_step_add_the_same_update(name: str) -> None:
    """One base update (``cost_fast.update``) for both: the same .grad, to the bit, for every
    registered method, given the same method state."""
    from tug import build, make_method

    model, batches, cost, _ = build(name)  # teleports off
    cost.step(batch_task_losses(model, batches[0]), batches[0])  # some method state first
    method = make_method(name)
    method.load_state_dict(copy.deepcopy(cost.base.state_dict()))
    if isinstance(method, torch.nn.Module):  # a loss weighting's learned parameters, as COST's
        method.load_state_dict(cost.base.state_dict())
    twin = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    cost.backward(batch_task_losses(model, batches[1]), batches[1])
    mtl_backward(batch_task_losses(twin, batches[1]), twin.backbone, method, heads=list(twin.heads.parameters()))
    for (key, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), f"{name}: {key}"
