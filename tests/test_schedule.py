"""cost_fast.teleport.schedule: when a teleport may run, and COST's clock (steps, epochs, the
teleports of an epoch)."""

from __future__ import annotations

import pytest
from tug import make_cost, tug_setup

from cost_fast import TeleportSchedule
from cost_fast.models import batch_task_losses
from cost_fast.teleport.schedule import Clock


def test_the_clock_allows_a_teleport_from_the_start_at_most_so_often_and_never_mid_accumulation() -> None:
    clock = Clock(TeleportSchedule(start_step=2, start_epoch=1, max_per_epoch=2, steps_per_epoch=3))
    allowed = []
    for _ in range(9):
        allowed.append(clock.allows_teleport(accumulating=False))
        if allowed[-1]:
            assert not clock.allows_teleport(accumulating=True)
            clock.count_teleport()
        if clock.tick():
            clock.new_epoch()
    # epoch 0 (steps 0-2): before start_epoch; epoch 1 (3-5): two of three; epoch 2 (6-8): two
    assert allowed == [False, False, False, True, True, False, True, True, False]
    assert (clock.step_count, clock.epoch, clock.teleports_this_epoch) == (9, 3, 0)
    state = clock.state_dict()
    other = Clock(clock.schedule)
    assert other.state_problems(state) == []
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert "must be an int ≥ 0" in other.state_problems({**state, "epoch": -1})[0]
    assert "not" in other.state_problems({"epoch": 1})[0]


def test_a_schedule_is_checked_when_it_is_built() -> None:
    for bad in ({"start_step": -1}, {"max_per_epoch": 1.5}, {"steps_per_epoch": 0}, {"start_epoch": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TeleportSchedule(**bad)


def test_epochs_without_a_length_need_end_epoch() -> None:
    model, batches = tug_setup(3)

    class Reiterable:  # teleport data without a length
        def __iter__(self):
            return iter(batches[:2])

    cost, _ = make_cost(
        model,
        batches,
        teleport_data=Reiterable(),
        schedule=TeleportSchedule(steps_per_epoch=None, start_step=1),
    )
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    assert sum(i.attempted_teleport for i in infos) == 1 and cost.epoch == 0
    cost.end_epoch()
    assert cost.epoch == 1
    counted, _ = make_cost(*tug_setup(3))
    with pytest.raises(RuntimeError, match="counts epochs itself"):
        counted.end_epoch()
