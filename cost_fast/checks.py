"""Argument checks shared by every constructor and config of the package: each raises
``ValueError`` naming the argument and the value it got, before any work starts. And
``all_finite``, the one finiteness test of tensors that COST's step and teleport decide by."""

from __future__ import annotations

import torch


def check_positive(name: str, value: float) -> float:
    """A hyperparameter that must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """A hyperparameter that must be a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_rate(name: str, value: float) -> float:
    """A hyperparameter that must be a number in [0, 1) (a decay, a momentum, a cosine bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_int(name: str, value: int | None, minimum: int, *, optional: bool = False) -> int | None:
    """An int ≥ ``minimum`` (a bool is refused), or None where ``optional``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alternative = " or None" if optional else ""
        raise ValueError(f"{name} must be an int ≥ {minimum}{alternative}, got {value!r}")
    return value


def check_seed(name: str, value: int) -> int:
    """A seed torch's generators take: an int in [0, 2**63) (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
    return value


def all_finite(tensors: list[torch.Tensor | None]) -> bool:
    """True if no tensor holds a NaN or ±inf (None entries skipped): one multi-tensor max-norm
    and one host read. A max-norm cannot overflow for finite entries, whatever their dtype, and
    propagates NaN; the peaks are compared in float64, which holds any finite peak."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return True
    peaks = torch._foreach_norm(present, float("inf"))
    return bool(torch.isfinite(torch.stack([peak.double() for peak in peaks])).all())
