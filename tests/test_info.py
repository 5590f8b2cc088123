"""cost_fast.info: what a step reports (its losses and the base method's weights, besides the
statistics), the run's tally across a checkpoint, and the one warning when the trigger never
fires."""

from __future__ import annotations

import warnings

import pytest
import torch
from tug import build, make_cost, mlp_setup, tug_setup

from cost_fast import TeleportSchedule, get_aggregator, mtl_backward
from cost_fast.models import batch_task_losses


def test_a_step_reports_its_losses_and_the_weights_of_its_update() -> None:
    model, batches, cost, _ = build("mgda", schedule=TeleportSchedule(start_step=1))
    infos = []
    for batch in batches:
        losses = batch_task_losses(model, batch)
        twin = [p.detach().clone() for p in model.parameters()]
        info = cost.step(losses, batch)
        assert info.losses == losses.detach().tolist()
        if info.attempted_teleport:
            assert info.weights is None  # a teleport's step takes no base update
        else:  # the weights mtl_backward gives at the same point, from the same losses
            check = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                for p, saved in zip(model.parameters(), twin):
                    p.copy_(saved)
            model.zero_grad()
            result = mtl_backward(batch_task_losses(model, batch), model.backbone, get_aggregator("mgda"))
            assert info.weights == pytest.approx(result.weights.tolist(), rel=1e-12)
            with torch.no_grad():
                for p, after in zip(model.parameters(), check):
                    p.copy_(after)
        infos.append(info)
    assert any(i.attempted_teleport for i in infos) and any(i.weights is not None for i in infos)
    model, batches, cost, _ = build("graddrop")
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert info.skipped is None and info.weights is None  # a gradient method has an update, not weights


def test_the_tally_counts_the_run_and_goes_on_after_a_resume() -> None:
    model, batches, cost, opt = build("mgda", schedule=TeleportSchedule(start_step=1))
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    summary = cost.tally.summary()
    assert summary["steps"] == 8
    assert summary["triggered"] == sum(i.trigger for i in infos)
    assert summary["teleported"] == sum(i.teleported for i in infos) >= 1
    assert summary["rolled_back"] == sum(i.rolled_back for i in infos)
    assert summary["htr_reset"] + summary["htr_modulated"] == sum(i.htr is not None for i in infos)
    state = cost.state_dict()
    _, _, fresh, _ = build("mgda", seed=1, schedule=TeleportSchedule(start_step=1))
    fresh.load_state_dict(state)
    assert fresh.tally.summary() == summary
    fresh.step(batch_task_losses(model, batches[0]), batches[0])
    assert fresh.tally.summary()["steps"] == 9


def test_a_trigger_that_never_fires_is_said_once() -> None:
    model, batches = mlp_setup(1)  # the heads agree enough that the public trigger never fires
    cost, _ = make_cost(model, batches, get_aggregator("mean"), teleport_data=batches)
    with pytest.warns(UserWarning, match="did not fire in epoch 0") as said:
        for _ in range(3):
            for batch in batches:
                info = cost.step(batch_task_losses(model, batch), batch)
                assert not info.trigger
    assert sum("did not fire" in str(w.message) for w in said) == 1  # once, not per epoch
    model, batches = tug_setup(1)  # a tug of war: the trigger fires, nothing is said
    cost, _ = make_cost(model, batches, schedule=TeleportSchedule(start_step=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches * 2:
            cost.step(batch_task_losses(model, batch), batch)
    model, batches = mlp_setup(1)
    quiet, _ = make_cost(model, batches, schedule=TeleportSchedule(max_per_epoch=0))  # teleports off: no word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches * 2:
            quiet.step(batch_task_losses(model, batch), batch)
