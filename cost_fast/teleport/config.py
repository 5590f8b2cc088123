"""The teleport's settings, each a frozen dataclass checked when it is built (change one with
``dataclasses.replace``): ``TeleportConfig`` (what every teleport does: the adapter's training,
the guard, the level set), ``AdapterConfig`` (the LoRA/LoHa adapter: kind, rank, the layers it
adapts) and ``RescaleConfig`` (the rescaling teleport's ascent). ``COST(teleport=...,
adapter=...)`` takes them; ``adapter_config`` resolves the short names "lora", "loha" and
"rescale"."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from cost_fast.checks import check_int, check_positive
from cost_fast.teleport.semantics import Semantics

ADAPTERS = ("lora", "loha", "rescale")


@dataclasses.dataclass(frozen=True)
class TeleportConfig:
    """Settings of a teleport that do not depend on the semantics (frozen: use
    ``dataclasses.replace`` to change one).

    Attributes:
        lr: Adam learning rate of the adapter (default None: the lr of the training
            optimizer's first group, as the public code uses the model's).
        rounds: passes over the teleport data (``tele_round``, default 2).
        max_steps: optional budget of adapter steps (stops the passes early).
        num_samples: n perturbations per step for L_g (default 5).
        guard: evaluate the teleport data after the merge and roll back on a rise (default
            None: the semantics' ``default_guard``, off in public semantics, on in paper).
        guard_tolerance: the rise, relative to |L*_i|, that rolls back (default 0.05).
        samples_per_pass: perturbed samples evaluated together in one vmapped forward pass
            (default None: all n on CUDA, 1 elsewhere, see ``resolved_samples_per_pass``; 1:
            one pass per sample, in place). Values over 1 cost that many copies of the
            perturbed parameters; a loss that ``vmap`` cannot trace falls back to 1.
        stack_batches: an adapter step's two forward passes with grad (the current batch of
            L_g, the teleport batch of L_t) as one vmapped pass over the two stacked batches
            where their shapes agree; equal to the two passes up to rounding. Default False:
            whether it launches fewer ops depends on the model (bench/results/launches_cpu.json:
            fewer on the NYUv2-shaped SegNet, more on the CelebA-shaped CNN, whose 40 separate
            heads vmap turns into more ops than it saves).
        cuda_graphs: capture the adapter step in a CUDA graph after two eager steps and replay
            it (``cost_fast.teleport.graphs``: what it needs, and a ``CaptureRefused`` warning
            naming what is missing, the steps then eager). Default False.
        measure_level_set: evaluate the teleport data after the merge to report the level-set
            error (module docstring; default True). False skips that pass when nothing else
            needs it (the guard and ``level_set_tolerance`` do), as the public code does.
        level_set_tolerance: None (default) merges the trained ΔW whole; a number makes the
            teleport loss-preserving: the largest t in 1, 1/2, … with level-set error ≤ it.
        level_set_floor: the floor of the error's denominator (default 1e-3), so that a loss
            near zero is judged by absolute change.
        level_set_halvings: how many times t is halved before a rollback (default 5: t ≥ 1/32).
    """

    lr: float | None = None
    rounds: int = 2
    max_steps: int | None = None
    num_samples: int = 5
    guard: bool | None = None
    guard_tolerance: float = 0.05
    samples_per_pass: int | None = None
    stack_batches: bool = False
    cuda_graphs: bool = False
    measure_level_set: bool = True
    level_set_tolerance: float | None = None
    level_set_floor: float = 1e-3
    level_set_halvings: int = 5

    def __post_init__(self) -> None:
        if self.lr is not None and not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0 or None, got {self.lr!r}")
        for name in ("rounds", "num_samples"):
            check_int(name, getattr(self, name), 1)
        check_int("samples_per_pass", self.samples_per_pass, 1, optional=True)
        for name in ("stack_batches", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("max_steps", self.max_steps, 1, optional=True)
        if self.guard is not None and not isinstance(self.guard, bool):
            raise ValueError(f"guard must be True, False or None, got {self.guard!r}")
        if not (isinstance(self.guard_tolerance, int | float) and self.guard_tolerance >= 0):
            raise ValueError(f"guard_tolerance must be ≥ 0, got {self.guard_tolerance!r}")
        if not isinstance(self.measure_level_set, bool):
            raise ValueError(f"measure_level_set must be True or False, got {self.measure_level_set!r}")
        tolerance = self.level_set_tolerance
        if tolerance is not None and not (
            isinstance(tolerance, int | float) and not isinstance(tolerance, bool) and 0 <= tolerance < float("inf")
        ):
            raise ValueError(f"level_set_tolerance must be a finite number ≥ 0 or None, got {tolerance!r}")
        if not (isinstance(self.level_set_floor, int | float) and 0 < self.level_set_floor < float("inf")):
            raise ValueError(f"level_set_floor must be a finite number > 0, got {self.level_set_floor!r}")
        check_int("level_set_halvings", self.level_set_halvings, 0)

    def guard_for(self, semantics: Semantics) -> bool:
        """Whether the guard runs: ``guard`` when set, else the semantics' ``default_guard``."""
        return self.guard if self.guard is not None else semantics.default_guard

    def resolved_samples_per_pass(self, device: torch.device, *, parallel: bool = False) -> int:
        """``samples_per_pass``, or where None: all n samples in one pass on CUDA (a step there
        costs its launches, and the batched pass launches fewer: bench/results/launches_cpu.json),
        one per pass elsewhere (on CPU the batched pass was slower on three of the four
        workloads of bench/results/adapter_cpu.json) and across ranks (``parallel``: the losses
        there sum over the group, which ``vmap`` cannot trace)."""
        if self.samples_per_pass is not None:
            return self.samples_per_pass
        return self.num_samples if device.type == "cuda" and not parallel else 1

    def evaluates_after(self, semantics: Semantics) -> bool:
        """Whether the teleport data is evaluated after the merge (level-set error, guard or
        loss-preserving teleport)."""
        return self.measure_level_set or self.guard_for(semantics) or self.level_set_tolerance is not None


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The teleport's low-rank adapter (``cost_fast.teleport.lora``).

    Attributes:
        method: ``"lora"`` (W + s·BA, default) or ``"loha"`` (W + s·(W1a W1b ⊙ W2a W2b)); its
            scale s = alpha / rank takes alpha from the semantics.
        rank: r ≥ 1 (default 5, as the public code).
        targets: ``targets(name, layer) -> bool`` chooses the adapted layers among the
            backbone's trainable Linear/Conv ones (``name`` relative to the backbone; default
            None: all of them).
    """

    method: Literal["lora", "loha"] = "lora"
    rank: int = 5
    targets: Callable[[str, nn.Module], bool] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("lora", "loha"):
            raise ValueError(
                f"AdapterConfig.method must be 'lora' or 'loha' (OFT is not supported), got {self.method!r}"
            )
        check_int("rank", self.rank, 1)
        if self.targets is not None and not callable(self.targets):
            raise TypeError(f"targets must be callable as targets(name, layer) -> bool, got {self.targets!r}")


@dataclasses.dataclass(frozen=True)
class RescaleConfig:
    """The rescaling teleport (``cost_fast.teleport.rescaling``): gradient ascent on the
    log-scales s of the hidden units of J(s) = log ‖∇_θ L(g_s · θ)‖².

    Attributes:
        steps: ascent steps (default 10). lr: their size (default 0.1).
        max_log_scale: |s_k| is clipped to this (default 2: scales within e^±2), so that no
            unit is driven to a degenerate scale.
    """

    steps: int = 10
    lr: float = 0.1
    max_log_scale: float = 2.0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_positive("lr", self.lr)
        check_positive("max_log_scale", self.max_log_scale)


def adapter_config(adapter: str | AdapterConfig | RescaleConfig) -> AdapterConfig | RescaleConfig:
    """The adapter's config from a short name (``"lora"``, ``"loha"``: ``AdapterConfig`` with that
    method; ``"rescale"``: ``RescaleConfig()``) or as given."""
    if isinstance(adapter, AdapterConfig | RescaleConfig):
        return adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, an AdapterConfig or a RescaleConfig, got {adapter!r}")
    return RescaleConfig() if adapter == "rescale" else AdapterConfig(adapter)
