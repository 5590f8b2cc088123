"""``StepInfo``: what one ``COST.step`` saw and did, as host values."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from cost_fast.kernels import GramStats
from cost_fast.timing import PhaseTimer
from cost_fast.update import NONFINITE


@dataclasses.dataclass
class StepInfo:
    """What one ``COST.step`` saw and did (host values).

    ``skipped`` says why a step changed nothing (non-finite values), else None. A teleport that
    the guard rolled back has ``rolled_back`` True and its ``rollback_reason``."""

    step: int
    epoch: int
    num_dominated: int
    num_conflicting_pairs: int
    min_cos_mean: float
    mean_norm: float  # ‖g0‖, the norm of the mean task gradient
    trigger: bool
    skipped: str | None = None
    teleported: bool = False
    stepped_after_teleport: bool = False
    rolled_back: bool = False
    rollback_reason: str | None = None
    sigma: float | None = None
    htr: str | None = None
    teleport_steps: int = 0
    # rescaling teleport: conflict statistics of the batch before and after, and J per step
    symmetry: dict[str, Any] | None = None
    task_terms: list[float] = dataclasses.field(default_factory=list)  # L_t per adapter step
    sharpness_terms: list[float] = dataclasses.field(default_factory=list)  # L_g per adapter step
    # max_i |L_i(after) - L*_i| / max(|L*_i|, floor) on the teleport data (cost_fast.teleport),
    # at the point merged (or last tried, if rolled back); None if not measured
    level_set_error: float | None = None
    merged_fraction: float | None = None  # t of W + t·ΔW (below 1 only with level_set_tolerance)
    task_names: tuple[str, ...] | None = None  # the keys of a dict of losses, in their order
    timer: PhaseTimer | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def read(
        cls,
        step: int,
        epoch: int,
        stats: GramStats,
        *,
        fires: torch.Tensor,
        finite: torch.Tensor,
        timer: PhaseTimer,
    ) -> StepInfo:
        """The step's decision and the statistics it reports, in one host read: the trigger
        (``fires``, a bool device tensor) and whether the losses and task gradients are finite
        (``finite``; if not, ``skipped`` says so)."""
        dominated, pairs, min_cos, mean_norm, fired, ok = torch.stack(
            [
                stats.num_dominated.double(),
                stats.num_conflicting_pairs.double(),
                stats.cos_mean.min().double(),
                stats.mean_norm.double(),
                fires.double(),
                finite.double(),
            ]
        ).tolist()
        return cls(
            step=step,
            epoch=epoch,
            num_dominated=int(dominated),
            num_conflicting_pairs=int(pairs),
            min_cos_mean=min_cos,
            mean_norm=mean_norm,
            trigger=bool(fired),
            skipped=None if ok else NONFINITE,
            timer=timer,
        )

    @property
    def seconds(self) -> dict[str, float]:
        """Time per phase (gradients, gram, solve, teleport, optimizer_step): device time on
        CUDA (reading it waits for the step's events), wall time elsewhere."""
        return {} if self.timer is None else self.timer.seconds()

    @property
    def attempted_teleport(self) -> bool:
        """A teleport ran (merged or rolled back)."""
        return self.teleported or self.rolled_back
