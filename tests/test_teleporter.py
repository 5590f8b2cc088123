"""cost_fast.teleport.teleporter inside COST: teleports under frequency control, reported in
StepInfo, with HTR from σ = cos(Δθ, g') computed from what the teleport did; both semantics, LoRA
and LoHa."""

from __future__ import annotations

import copy

import pytest
import torch
from tug import make_cost, tug_setup

from cost_fast import COST, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.models import batch_task_losses


def teleport_step(cost, model, batches):
    """Step until a teleport runs; return its StepInfo, Δθ of the backbone (the teleport's step
    takes no base update, so all of the change is the teleport's) and g' (the engine's last
    update: the step before's in public semantics, the pre-teleport direction in paper ones)."""
    for batch in batches:
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.backbone.parameters()])
        info = cost.step(batch_task_losses(model, batch), batch)
        if info.attempted_teleport:
            after = torch.cat([p.detach().reshape(-1) for p in model.backbone.parameters()])
            return info, after - before, cost.engine.combined.clone()
    raise AssertionError("no teleport ran")


def check_htr(cost, optimizer, model, batch, info, delta, g_prime) -> None:
    """σ = cos(Δθ, g'); σ ≤ 0 starts a fresh Adam at once, σ > 0 makes the next optimizer step
    run with betas (σβ1, σβ2), then the betas are back."""
    sigma = float(delta.double() @ g_prime.double() / (delta.double().norm() * g_prime.double().norm()))
    assert info.teleported and delta.abs().max() > 0
    assert info.sigma == pytest.approx(sigma, rel=1e-4, abs=1e-6)
    seen = []
    hook = optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["betas"]))
    if sigma <= 0:
        assert info.htr == "reset" and len(optimizer.state) == 0 and cost.htr.pending_sigma is None
    else:
        assert info.htr == "modulated" and cost.htr.pending_sigma == pytest.approx(min(sigma, 1.0))
    cost.step(batch_task_losses(model, batch), batch)
    hook.remove()
    factor = 1.0 if sigma <= 0 else min(sigma, 1.0)
    assert seen[0] == pytest.approx((factor * 0.9, factor * 0.999))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999) and cost.htr.pending_sigma is None


def test_teleport_once_per_epoch_with_htr() -> None:
    model, batches = tug_setup(1)
    cost, optimizer = make_cost(model, batches, schedule=TeleportSchedule(start_step=1))
    info, delta, g_prime = teleport_step(cost, model, batches)
    assert info.step == 1 and info.trigger  # delayed start
    assert info.teleport_steps == 2 and len(info.task_terms) == 2 and info.sharpness_terms[1] >= 0
    check_htr(cost, optimizer, model, batches[2], info, delta, g_prime)
    info = cost.step(batch_task_losses(model, batches[3]), batches[3])
    assert info.trigger and not info.attempted_teleport  # frequency control: one per epoch
    assert cost.epoch == 1  # 4 steps per epoch, counted by COST
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert info.attempted_teleport  # a new epoch allows a new teleport
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_paper_semantics_trigger_teleport_and_htr() -> None:
    from cost_fast import PaperSemantics

    model, batches = tug_setup(2)
    cost, optimizer = make_cost(
        model, batches, semantics=PaperSemantics(relative_radius=1e-2), schedule=TeleportSchedule(start_step=1)
    )
    info, delta, g_prime = teleport_step(cost, model, batches)
    assert info.trigger == (info.num_dominated >= 2)  # Eq. 4 with K = 4
    assert info.teleport_steps == 2 and info.sharpness_terms[0] > 0
    check_htr(cost, optimizer, model, batches[3], info, delta, g_prime)
    for batch in batches:
        info = cost.step(batch_task_losses(model, batch), batch)
        assert info.trigger == (info.num_dominated >= 2)


def test_paper_g_prime_does_not_advance_a_stateful_method() -> None:
    model, batches = tug_setup(2)
    base = get_aggregator("pcgrad", seed=3)
    cost, _ = make_cost(
        model,
        batches,
        base,
        semantics="paper",
        schedule=TeleportSchedule(start_step=1),
    )
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    state = copy.deepcopy(base.state_dict())
    info = cost.step(batch_task_losses(model, batches[1]), batches[1])
    assert info.attempted_teleport and info.sigma is not None
    assert torch.equal(base.state_dict()["rng_state"], state["rng_state"])


def test_loha_adapter_teleports() -> None:
    model, batches = tug_setup(5)
    cost, optimizer = make_cost(model, batches, schedule=TeleportSchedule(start_step=1), adapter="loha")
    info, delta, g_prime = teleport_step(cost, model, batches)
    assert cost.adapter.method == "loha" and info.teleport_steps == 2 and not info.rolled_back
    check_htr(cost, optimizer, model, batches[2], info, delta, g_prime)


def test_step_info_reports_the_level_set_error_of_the_teleport() -> None:
    model, batches = tug_setup(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)  # the base step moves nothing
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mean"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        teleport=TeleportConfig(lr=0.05, rounds=2),
    )

    def contour() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([batch_task_losses(model, b).double() for b in batches[:2]]).mean(0)

    for batch in batches * 3:  # Adam at lr 0 moves nothing: only a teleport changes the model
        before = contour()
        info = cost.step(batch_task_losses(model, batch), batch)
        if info.attempted_teleport:
            break
    assert info.teleported and info.merged_fraction == 1
    expected = float(((contour() - before).abs() / before.abs().clamp_min(1e-3)).max())
    assert expected > 0 and info.level_set_error == pytest.approx(expected, rel=1e-5)


# Rows are task gradients; each case names which triggers fire (hand-computed: g0 is the mean).
TRIGGER_CASES = [
    # g0 = (0.5, 0.5): every task agrees with the mean -> none fire
    ([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], set()),
    # g0 = (1/3)(1.9, 1) ; g3 = (-0.1, 0) small and against the mean: weak and dominated, not majority
    ([[1.0, 0.0], [1.0, 1.0], [-0.1, 0.0]], {"weak", "dominated"}),
    # g0 = (1/3)(-1.3, -1.2); the small g1 = (0.2, 0.1) conflicts and so does g3: all three
    ([[0.2, 0.1], [-3.0, 0.2], [1.5, -1.5]], {"weak", "dominated", "majority"}),
    # a large g1 against the mean, the smallest norm g3 along it: weak only
    ([[-2.0, 0.0], [3.0, 1.0], [0.3, 0.1]], {"weak"}),
]


@pytest.mark.parametrize(("rows", "firing"), TRIGGER_CASES)
@pytest.mark.parametrize("semantics", ["public", "paper"])
def test_each_trigger_fires_as_its_equation_says(rows, firing, semantics) -> None:
    from cost_fast import gram_stats
    from cost_fast.teleport.semantics import SEMANTICS, TRIGGERS

    G = torch.tensor(rows, dtype=torch.float64)
    stats = gram_stats(G @ G.T)
    g0 = G.mean(0)
    cos = [float(g @ g0 / (g.norm() * g0.norm())) for g in G]
    smallest = int(G.norm(dim=1).argmin())
    by_hand = {
        "weak": min(cos) <= 0,
        "dominated": cos[smallest] < 0,
        "majority": sum(c < 0 for c in cos) >= 2,  # ⌈3/2⌉
        "always": True,
    }
    assert {name for name, fired in by_hand.items() if fired} == firing | {"always"}  # the case is what it says
    for name in TRIGGERS:
        chosen = SEMANTICS[semantics](trigger=name)
        assert chosen.trigger_name == name and bool(chosen.fires(stats)) == by_hand[name], name
    default = SEMANTICS[semantics]()
    assert bool(default.fires(stats)) == by_hand["weak" if semantics == "public" else "majority"]


def test_an_unknown_trigger_is_refused() -> None:
    from cost_fast import PublicSemantics

    with pytest.raises(ValueError, match="trigger must be one of"):
        PublicSemantics(trigger="sometimes")
