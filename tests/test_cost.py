"""COST assembled from its parts: bad arguments refused before any work, one COST per optimizer
(a newer one closes the earlier, hooks never stack, close() removes them), checkpoints with the
plain model's keys, frozen layers untouched, torch's global generator untouched, the
backward-style API under autocast."""

from __future__ import annotations

import io

import pytest
import torch
from tug import K, TugOfWar, make_cost, mlp_setup, tug_setup

from cost_fast import COST, AdapterConfig, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.models import batch_task_losses

# -- checkpoints, frozen layers, global generator ----------------------------------------------


def test_checkpoints_keep_the_plain_models_keys_and_cost_state_loads_weights_only() -> None:
    model, batches = tug_setup(4)
    keys = list(TugOfWar().state_dict())
    cost, _ = make_cost(
        model,
        batches,
        get_aggregator("pcgrad", seed=1),
        schedule=TeleportSchedule(start_step=1),
    )
    assert list(model.state_dict()) == keys
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert any(i.teleported for i in infos)
    assert list(model.state_dict()) == keys
    fresh = TugOfWar()
    fresh.load_state_dict(model.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(cost.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other, _ = make_cost(
        fresh,
        batches,
        get_aggregator("pcgrad", seed=1),
        schedule=TeleportSchedule(start_step=1),
    )
    other.load_state_dict(state)
    assert other.step_count == cost.step_count and other.epoch == cost.epoch


def test_frozen_layers_never_change_and_a_frozen_backbone_is_refused() -> None:
    model, batches = tug_setup(5)
    model.backbone[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model.backbone[0].parameters()]
    cost, _ = make_cost(
        model,
        batches,
        schedule=TeleportSchedule(start_step=1, steps_per_epoch=1),
    )
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert sum(i.teleported for i in infos) >= 2
    assert all(torch.equal(p, f) for p, f in zip(model.backbone[0].parameters(), frozen))
    model.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the shared backbone is frozen"):
        make_cost(model, batches)


def test_cost_leaves_the_global_generator_alone() -> None:
    model, batches = tug_setup(6)
    cost, _ = make_cost(
        model,
        batches,
        schedule=TeleportSchedule(start_step=1),
    )
    state = torch.get_rng_state()
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert any(i.attempted_teleport for i in infos)
    assert torch.equal(torch.get_rng_state(), state)


# -- drop-in API -----------------------------------------------------------------------------


def test_backward_leaves_the_step_to_the_caller_under_autocast() -> None:
    model, batches = tug_setup(7)

    def loss_fn(m, batch):  # mixed precision, as a user's script would write it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batch_task_losses(m, batch).float()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        optimizer,
        loss_fn=loss_fn,
        teleport_data=batches[:2],
        schedule=TeleportSchedule(steps_per_epoch=4, start_step=2),
        teleport=TeleportConfig(rounds=1, guard=False),
    )
    first = float(loss_fn(model, batches[0]).sum().detach())
    infos = []
    for _ in range(3):
        for batch in batches:
            optimizer.zero_grad()  # backward() adds into .grad, as torch's does
            info = cost.backward(loss_fn(model, batch), batch)
            infos.append(info)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the caller's own step
            optimizer.step()
            assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert any(i.htr == "modulated" for i in infos) or any(i.htr == "reset" for i in infos)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(loss_fn(model, batches[0]).sum().detach()) < first
    assert cost.htr.pending_sigma is None  # a pending HTR was applied by the caller's step


def test_bad_arguments() -> None:
    model, batches = mlp_setup()
    opt = torch.optim.Adam(model.parameters())
    fairgrad = get_aggregator("fairgrad")
    kw = {"loss_fn": batch_task_losses, "teleport_data": batches}
    with pytest.raises(TypeError, match="base must be an Aggregator, a LossWeighting, a method's name"):
        COST(model, model.backbone, 42, opt, **kw)
    with pytest.raises(ValueError, match="unknown aggregator 'fairgrade'"):
        COST(model, model.backbone, "fairgrade", opt, **kw)
    with pytest.raises(ValueError, match="semantics"):
        COST(model, model.backbone, fairgrad, opt, semantics="sometimes", **kw)
    with pytest.raises(ValueError, match="submodule"):
        COST(model, torch.nn.Linear(2, 2), fairgrad, opt, **kw)
    with pytest.raises(TypeError, match="callable"):
        COST(model, model.backbone, fairgrad, opt, loss_fn=None, teleport_data=batches)
    with pytest.raises(TypeError, match="positional"):
        COST(model, model.backbone, fairgrad, opt, batch_task_losses, batches)
    with pytest.raises(ValueError, match="re-iterable"):
        COST(model, model.backbone, fairgrad, opt, loss_fn=batch_task_losses, teleport_data=iter(batches))
    with pytest.raises(ValueError, match="not in the optimizer"):
        COST(model, model.backbone, get_aggregator("uw", num_tasks=K), opt, **kw)
    with pytest.raises(ValueError, match="no trainable Linear or Conv"):
        odd = torch.nn.Module()
        odd.backbone = torch.nn.Sequential(torch.nn.LayerNorm(3))
        COST(odd, odd.backbone, fairgrad, torch.optim.Adam(odd.parameters()), **kw)
    cost, opt = make_cost(model, batches)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="1-D tensor"):
        cost.step(batch_task_losses(model, batches[0]).sum(), batches[0])
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    with pytest.raises(ValueError, match="4 task losses"):
        cost.step(batch_task_losses(model, batches[0])[:3], batches[0])
    assert cost.step_count == 1 and any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_flat_noise_refuses_a_model_of_two_dtypes_before_any_step() -> None:
    from cost_fast.teleport.semantics import PublicSemantics

    model, batches = mlp_setup(0)
    model.heads.double()  # one (n, P) draw cannot hold float32 and float64 parameters
    with pytest.raises(ValueError, match="noise='per_tensor'"):
        make_cost(model, batches)
    cost, _ = make_cost(model, batches, semantics=PublicSemantics(noise="per_tensor"))
    assert cost.semantics.noise == "per_tensor"


def test_fairgrad_at_alpha_1_and_nash_mtl_train_identically() -> None:
    # M w = w^(-1/α) at α = 1 is Nash-MTL's M w = 1/w: the methods table says they are one method
    runs = []
    for method in (get_aggregator("fairgrad", alpha=1.0), get_aggregator("nash_mtl")):
        model, batches = tug_setup(3)
        cost, _ = make_cost(model, batches, method, teleport=TeleportConfig(lr=1e-2, rounds=1))
        infos = [cost.step(batch_task_losses(model, b), b) for _ in range(3) for b in batches]
        runs.append((model.state_dict(), [i.teleported for i in infos]))
    (first, teleported), (second, teleported_again) = runs
    assert any(teleported) and teleported == teleported_again
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


# -- one COST per optimizer ------------------------------------------------------------------


def hooks(optimizer) -> tuple[int, int]:
    return len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)


def test_a_newer_cost_over_the_same_optimizer_closes_the_earlier_one_and_hooks_never_stack() -> None:
    model, batches = tug_setup(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    plain = hooks(optimizer)

    def build():
        return COST(model, model.backbone, "fairgrad", optimizer, loss_fn=batch_task_losses, teleport_data=batches)

    first = build()
    per_cost = (hooks(optimizer)[0] - plain[0], hooks(optimizer)[1] - plain[1])
    assert per_cost == (2, 2)  # HTR's and the base step's, before and after the optimizer step
    with pytest.warns(UserWarning, match="earlier COST over this optimizer was closed"):
        second = build()
    with pytest.warns(UserWarning, match="earlier COST"):
        third = build()
    assert hooks(optimizer) == (plain[0] + 2, plain[1] + 2)  # one COST's hooks, not three
    assert first.closed and second.closed and not third.closed
    with pytest.raises(RuntimeError, match="this COST is closed"):
        first.step(batch_task_losses(model, batches[0]), batches[0])
    third.step(batch_task_losses(model, batches[0]), batches[0])
    third.close()
    third.close()  # twice does nothing
    assert hooks(optimizer) == plain and third.closed
    with COST(model, model.backbone, "mean", optimizer, loss_fn=batch_task_losses, teleport_data=batches) as cost:
        assert hooks(optimizer) == (plain[0] + 2, plain[1] + 2)
        cost.step(batch_task_losses(model, batches[1]), batches[1])
    assert hooks(optimizer) == plain


def test_a_refused_cost_leaves_no_hook_behind() -> None:
    model, batches = tug_setup(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    plain = hooks(optimizer)
    with pytest.raises(ValueError, match="targets chose none"):  # refused after HTR was built
        COST(
            model,
            model.backbone,
            "fairgrad",
            optimizer,
            loss_fn=batch_task_losses,
            teleport_data=batches,
            adapter=AdapterConfig(targets=lambda name, layer: False),
        )
    assert hooks(optimizer) == plain


def test_a_resume_into_a_second_cost_applies_the_pending_htr_once() -> None:
    """An HTR pending in the first COST's state applies once in the second, built over the same
    optimizer: that step runs with betas (σβ1, σβ2), every other with Adam's own, and the first
    COST (closed by the second) modulates nothing."""
    model, batches = tug_setup(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def build() -> COST:
        return COST(
            model,
            model.backbone,
            get_aggregator("fairgrad"),
            optimizer,
            loss_fn=batch_task_losses,
            teleport_data=batches,
            schedule=TeleportSchedule(start_step=1, steps_per_epoch=4),
            teleport=TeleportConfig(rounds=1),
        )

    first = build()
    for batch in batches:
        info = first.step(batch_task_losses(model, batch), batch)
        if info.attempted_teleport:
            break
    assert info.htr == "modulated" and first.htr.pending_sigma is not None
    state = first.state_dict()
    with pytest.warns(UserWarning, match="earlier COST"):
        second = build()
    assert first.htr.pending_sigma is None  # closed: its pending HTR is dropped
    second.load_state_dict(state)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["betas"]))
    sigma = state["htr"]["pending_sigma"]
    second.step(batch_task_losses(model, batches[2]), batches[2])  # no teleport: one per epoch
    second.step(batch_task_losses(model, batches[3]), batches[3])
    assert seen == [pytest.approx((sigma * 0.9, sigma * 0.999)), (0.9, 0.999)]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
