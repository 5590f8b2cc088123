"""When COST may teleport, and COST's clock: steps, epochs and the teleports of an epoch.

A teleport may run when the semantics' trigger fires, from ``start_step`` and ``start_epoch`` on,
at most ``max_per_epoch`` times per epoch, and never in the middle of a gradient accumulation:
it would move the parameters the earlier micro-batches of that accumulation were taken at, so it
waits for a call that starts one. An epoch is ``steps_per_epoch`` steps, counted by the clock
(default: the length of the teleport data, when it has one); without a length the caller ends
each epoch (``COST.end_epoch()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cost_fast.checks import check_int

COUNTERS = ("step_count", "epoch", "teleports_this_epoch")


@dataclasses.dataclass(frozen=True)
class TeleportSchedule:
    """When COST may teleport (module docstring).

    Attributes:
        start_step, start_epoch: no teleport before these (the public code's ``lora_epoch``;
            default 0).
        max_per_epoch: at most this many teleports per epoch (the public code's
            ``tele_times_per_epoch``; default 1; 0: never).
        steps_per_epoch: steps per epoch (default None: ``len(teleport_data)`` when it has a
            length, else the caller ends each epoch with ``COST.end_epoch()``).
    """

    start_step: int = 0
    start_epoch: int = 0
    max_per_epoch: int = 1
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("start_step", "start_epoch", "max_per_epoch"):
            check_int(name, getattr(self, name), 0)
        check_int("steps_per_epoch", self.steps_per_epoch, 1, optional=True)


class Clock:
    """COST's counters under a ``TeleportSchedule``: the steps taken, the epoch, the teleports of
    this epoch. ``tick()`` counts a step and says whether it ended an epoch.

    Args:
        schedule: the ``TeleportSchedule``, its ``steps_per_epoch`` resolved (None: the caller
            ends each epoch).
    """

    def __init__(self, schedule: TeleportSchedule) -> None:
        self.schedule = schedule
        self.step_count = 0
        self.epoch = 0
        self.teleports_this_epoch = 0

    def allows_teleport(self, *, accumulating: bool) -> bool:
        """A teleport may run at this step, the trigger aside (module docstring); ``accumulating``:
        this call adds to gradients that an earlier call of this accumulation left."""
        schedule = self.schedule
        return (
            not accumulating
            and self.step_count >= schedule.start_step
            and self.epoch >= schedule.start_epoch
            and self.teleports_this_epoch < schedule.max_per_epoch
        )

    def count_teleport(self) -> None:
        """A teleport ran (merged or rolled back)."""
        self.teleports_this_epoch += 1

    def tick(self) -> bool:
        """Count a step; True when it ended an epoch (``steps_per_epoch`` steps)."""
        self.step_count += 1
        per_epoch = self.schedule.steps_per_epoch
        return per_epoch is not None and self.step_count % per_epoch == 0

    def new_epoch(self) -> None:
        """The next epoch begins."""
        self.epoch += 1
        self.teleports_this_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """{"step_count", "epoch", "teleports_this_epoch"}."""
        return {name: getattr(self, name) for name in COUNTERS}

    def state_problems(self, state: Any) -> list[str]:
        """What in ``state`` is not a clock's state ([] if it is one)."""
        if not isinstance(state, dict) or set(state) != set(COUNTERS):
            return [f"a clock state that is not {{{', '.join(map(repr, COUNTERS))}}}: {state!r}"]
        return [
            f"{name} must be an int ≥ 0, got {state[name]!r}"
            for name in COUNTERS
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0
        ]

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what ``state_dict`` returned."""
        for name in COUNTERS:
            setattr(self, name, state[name])

    def __repr__(self) -> str:
        return f"Clock({self.schedule})"
