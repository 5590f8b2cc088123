"""Historical trajectory reuse (HTR, COST Eqs. 12-13) for Adam-family optimizers.

After a teleport by Δθ, Adam's moments describe a trajectory the model has left. COST keeps them
in proportion to how well the teleport agrees with the last update direction g':

    σ = cos(Δθ, g')                                   (Eq. 12)
    m_t = σβ1 m_(t-1) + (1 - σβ1) g_t                  (Eq. 13)
    v_t = σβ2 v_(t-1) + (1 - σβ2) g_t²

for the one step after the teleport, then σ = 1 again. Eq. 13 is exactly Adam's moment update
with betas (σβ1, σβ2), so HTR sets those betas for the next ``optimizer.step()`` that updates
anything, and restores them right after it: the optimizer's own fused multi-tensor step does the
update, and its bias correction uses the same betas, as in the public COST code. With σ ≤ 0 the
public code starts a brand-new Adam (state cleared), which ``HistoryReuse`` does too.

The betas are changed only inside that step (a step pre-hook sets them, a post-hook restores
them), so ``optimizer.state_dict()`` never holds modulated betas; the pending σ is in
``HistoryReuse.state_dict()``, which a resumed run loads to apply it at its first step.
SGD and other optimizers without ``betas`` are not supported (HTR is then off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SUPPORTED = (torch.optim.Adam, torch.optim.AdamW)


def supports_htr(optimizer: torch.optim.Optimizer) -> bool:
    """True for Adam and AdamW (the optimizers whose moments HTR modulates)."""
    return isinstance(optimizer, SUPPORTED)


def flat_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """cos(a, b) of two parameter-shaped tensor lists seen as flat vectors, on their device:
    Σ⟨a_k, b_k⟩ / (sqrt(Σ‖a_k‖²) sqrt(Σ‖b_k‖²)), 0 when either is zero. Norms by one foreach
    call, dot products one per tensor; nothing is concatenated."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty lists of equal length, got {len(a)} and {len(b)}")
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    # at least float32 (half-precision models), float64 kept as it is
    dtype = torch.promote_types(torch.promote_types(a[0].dtype, b[0].dtype), torch.float32)
    dot = torch.stack([torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)]).sum()
    na = torch.stack(torch._foreach_norm([x.to(dtype) for x in a])).square().sum().sqrt()
    nb = torch.stack(torch._foreach_norm([y.to(dtype) for y in b])).square().sum().sqrt()
    denom = na * nb
    return torch.where(denom > 0, dot / denom.clamp_min(1e-30), torch.zeros_like(dot))


class HistoryReuse:
    """HTR on one Adam/AdamW optimizer.

    ``arm(σ)`` after a teleport: σ ≤ 0 clears the optimizer state at once (``"reset"``);
    σ > 0 makes the next ``optimizer.step()`` that has any gradient run with betas
    (σβ1, σβ2) (``"modulated"``), whoever calls it (``COST.step``, or the user after
    ``COST.backward``, e.g. through an AMP ``GradScaler``). A step without gradients, or one a
    ``GradScaler`` skips, leaves HTR pending.

    Args:
        optimizer: an ``torch.optim.Adam`` or ``AdamW``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not supports_htr(optimizer):
            raise TypeError(f"HTR needs Adam or AdamW, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.pending_sigma: float | None = None
        self._saved_betas: list[tuple[float, float]] | None = None
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def arm(self, sigma: float | torch.Tensor) -> str:
        """Apply HTR for σ (a cosine in [-1, 1]); returns ``"reset"`` or ``"modulated"``."""
        sigma = float(sigma)
        if not sigma == sigma or not -1.0 - 1e-6 <= sigma <= 1.0 + 1e-6:
            raise ValueError(f"sigma is a cosine in [-1, 1], got {sigma}")
        if sigma <= 0:
            self.optimizer.state.clear()
            self.pending_sigma = None
            return "reset"
        self.pending_sigma = min(sigma, 1.0)
        return "modulated"

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.pending_sigma is None:
            return
        if not any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            return  # this step updates nothing: keep HTR for the next one
        self._saved_betas = [tuple(group["betas"]) for group in optimizer.param_groups]
        for group, (b1, b2) in zip(optimizer.param_groups, self._saved_betas):
            group["betas"] = (self.pending_sigma * b1, self.pending_sigma * b2)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved_betas is None:
            return
        for group, betas in zip(optimizer.param_groups, self._saved_betas):
            group["betas"] = betas
        self._saved_betas = None
        self.pending_sigma = None

    def state_dict(self) -> dict[str, Any]:
        """{"pending_sigma": σ of an HTR not yet applied, or None}."""
        return {"pending_sigma": self.pending_sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        sigma = state["pending_sigma"]
        self.pending_sigma = None if sigma is None else float(sigma)

    def remove(self) -> None:
        """Detach from the optimizer (its hooks are removed; pending HTR is dropped)."""
        for hook in self._hooks:
            hook.remove()
        self.pending_sigma = None
