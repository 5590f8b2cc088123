"""What COST's steps saw and did: ``StepInfo`` for one step (host values), ``Tally`` for the run
so far (counts that travel in a checkpoint)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from cost_fast import host
from cost_fast.kernels import GramStats
from cost_fast.timing import PhaseTimer
from cost_fast.update import NONFINITE


@dataclasses.dataclass
class StepInfo:
    """What one ``COST.step`` saw and did (host values).

    ``skipped`` says why a step changed nothing (non-finite values), else None. A teleport that
    the guard rolled back has ``rolled_back`` True and its ``rollback_reason``. ``losses`` are
    the step's (global) task losses, read with the decision; ``weights`` the base method's task
    weights w of the step's update (None for a gradient method, a skipped step or a teleport's
    step), read from the device when first asked for."""

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
    losses: list[float] = dataclasses.field(default_factory=list)  # the K (global) task losses
    timer: PhaseTimer | None = dataclasses.field(default=None, repr=False)
    _weights: torch.Tensor | list[float] | None = dataclasses.field(default=None, repr=False)
    # M and the losses as the decision read brought them to the host (float64, CPU): the base
    # method solves on that M, a loss weighting checks those values
    host_gram: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    host_losses: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def weights(self) -> list[float] | None:
        """w of the step's base update (class docstring); one host read the first time."""
        if isinstance(self._weights, torch.Tensor):
            self._weights = self._weights.double().tolist()
        return self._weights

    def keep_weights(self, weights: torch.Tensor | None) -> None:
        """Keep the base update's w (a device tensor, read only if ``weights`` is asked for)."""
        self._weights = None if weights is None else weights.detach()

    @classmethod
    def read(
        cls,
        step: int,
        epoch: int,
        stats: GramStats,
        losses: torch.Tensor,
        *,
        fires: torch.Tensor,
        finite: torch.Tensor,
        timer: PhaseTimer,
    ) -> StepInfo:
        """The step's decision, the statistics it reports, the ``losses`` and the Gram matrix M,
        in one host read (``cost_fast.host.to_host``): the trigger (``fires``, a bool device
        tensor) and whether the losses and task gradients are finite (``finite``; if not,
        ``skipped`` says so). M's and the losses' host copies (``host_gram``, ``host_losses``) are
        what the base method solves on and checks."""
        K = losses.shape[0]
        device = stats.gram.device
        values = host.to_host(
            torch.cat(
                [
                    torch.stack(
                        [
                            stats.num_dominated.double(),
                            stats.num_conflicting_pairs.double(),
                            stats.cos_mean.min().double(),
                            stats.mean_norm.double(),
                            fires.double(),
                            finite.double(),
                        ]
                    ),
                    losses.detach().double().to(device),
                    stats.gram.detach().double().reshape(-1),
                ]
            )
        )
        dominated, pairs, min_cos, mean_norm, fired, ok, *values_list = values[: 6 + K].tolist()
        losses_host, gram = values[6 : 6 + K], values[6 + K :].view(stats.gram.shape)
        return cls(
            step=step,
            epoch=epoch,
            num_dominated=int(dominated),
            num_conflicting_pairs=int(pairs),
            min_cos_mean=min_cos,
            mean_norm=mean_norm,
            trigger=bool(fired),
            skipped=None if ok else NONFINITE,
            losses=values_list,
            timer=timer,
            host_gram=gram,
            host_losses=losses_host,
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


class QuietTriggerWarning(UserWarning):
    """COST's trigger did not fire in a whole epoch where teleports were allowed (said once per
    COST; filter it by this class where a report says as much)."""


COUNTS = ("steps", "triggered", "teleported", "rolled_back", "skipped", "htr_reset", "htr_modulated")


class Tally:
    """The run so far, counted from every ``StepInfo`` (``record``): steps, steps whose trigger
    fired, teleports merged and rolled back (and why), skipped steps, and what HTR did. Its state
    travels in COST's checkpoint, so a resumed run goes on counting.

    ``new_epoch`` closes an epoch, and says once (``QuietTriggerWarning``) when the trigger never fired
    in an epoch where teleports were allowed: COST then trained as its base method alone."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self.rollback_reasons: dict[str, int] = {}
        self.fired_this_epoch = False
        self._warned = False

    def record(self, info: StepInfo) -> None:
        """Count one step."""
        counts = self.counts
        counts["steps"] += 1
        counts["triggered"] += info.trigger
        counts["teleported"] += info.teleported
        counts["rolled_back"] += info.rolled_back
        counts["skipped"] += info.skipped is not None
        counts["htr_reset"] += info.htr == "reset"
        counts["htr_modulated"] += info.htr == "modulated"
        if info.rollback_reason is not None:
            self.rollback_reasons[info.rollback_reason] = self.rollback_reasons.get(info.rollback_reason, 0) + 1
        self.fired_this_epoch |= info.trigger

    def new_epoch(self, epoch: int, *, teleports_allowed: bool, semantics: str) -> None:
        """Close ``epoch`` (class docstring: the warning, once, for a quiet trigger)."""
        fired, self.fired_this_epoch = self.fired_this_epoch, False
        if not fired and teleports_allowed and not self._warned:
            self._warned = True
            warnings.warn(
                f"COST's trigger ({semantics} semantics) did not fire in epoch {epoch}: no teleport ran, so COST "
                "trained as its base method alone (StepInfo.min_cos_mean says how far the task gradients are from "
                "conflicting); said once",
                QuietTriggerWarning,
                stacklevel=5,
            )

    def summary(self) -> dict[str, Any]:
        """The counts, with the rollbacks by reason (plain values)."""
        return {**self.counts, "rollback_reasons": dict(self.rollback_reasons)}

    def state_dict(self) -> dict[str, Any]:
        """{"counts", "rollback_reasons", "fired_this_epoch"} (plain values)."""
        return {
            "counts": dict(self.counts),
            "rollback_reasons": dict(self.rollback_reasons),
            "fired_this_epoch": self.fired_this_epoch,
        }

    def state_problems(self, state: Any) -> list[str]:
        """What in ``state`` is not a tally's state ([] if it is one)."""
        keys = {"counts", "rollback_reasons", "fired_this_epoch"}
        if not isinstance(state, dict) or set(state) != keys:
            return [f"a tally state that is not {{{', '.join(map(repr, sorted(keys)))}}}"]
        counts, reasons = state["counts"], state["rollback_reasons"]

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not isinstance(counts, dict) or set(counts) != set(COUNTS) or not all(map(count, counts.values())):
            return [f"tally counts that are not {COUNTS} as ints ≥ 0: {counts!r}"]
        if not isinstance(reasons, dict) or not all(isinstance(k, str) and count(v) for k, v in reasons.items()):
            return [f"tally rollback reasons that are not {{reason: int ≥ 0}}: {reasons!r}"]
        if not isinstance(state["fired_this_epoch"], bool):
            return [f"a tally fired_this_epoch that is not a bool: {state['fired_this_epoch']!r}"]
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.counts = dict(state["counts"])
        self.rollback_reasons = dict(state["rollback_reasons"])
        self.fired_this_epoch = state["fired_this_epoch"]
