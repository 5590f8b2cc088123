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
    ``GradScaler`` skips, leaves HTR pending. ``close()`` removes its optimizer hooks.

    With ``keeps_last_update`` (the public semantics' g'), ``record_update`` keeps the last base
    update of the shared parameters (flat, (P,)) in a buffer of its own, apart from the gradient
    engine's, which a skipped step overwrites.

    Args:
        optimizer: an ``torch.optim.Adam`` or ``AdamW``.
        params: the shared parameters (the size, device and dtype of g'; default None: no g').
        keeps_last_update: keep the last base update as g' (default False: paper semantics,
            where g' is computed at the teleport, or no teleports).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        params: list[torch.Tensor] | None = None,
        keeps_last_update: bool = False,
    ) -> None:
        if not supports_htr(optimizer):
            raise TypeError(f"HTR needs Adam or AdamW, got {type(optimizer).__name__}")
        if keeps_last_update and not params:
            raise ValueError("keeps_last_update needs the shared parameters (params=...)")
        self.optimizer = optimizer
        self.keeps_last_update = keeps_last_update
        self.num_params = sum(p.numel() for p in params) if params else None
        self._like = params[0] if params else None
        self.pending_sigma: float | None = None
        self.last_update: torch.Tensor | None = None
        self._saved_betas: list[tuple[float, float]] | None = None
        self.hooks = [
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

    def record_update(self, update: torch.Tensor) -> None:
        """Keep the base update just taken (flat, (P,)) as g', when ``keeps_last_update``."""
        if not self.keeps_last_update:
            return
        if self.last_update is None:
            self.last_update = update.detach().clone()
        else:
            self.last_update.copy_(update)

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
        """{"pending_sigma": σ of an HTR not yet applied, or None; "last_update": g' (a copy),
        or None}."""
        last = self.last_update
        return {"pending_sigma": self.pending_sigma, "last_update": None if last is None else last.clone()}

    def state_problems(self, state: Any) -> list[str]:
        """What in ``state`` does not fit this HTR ([] if it fits); nothing is changed."""
        if not isinstance(state, dict) or set(state) != {"pending_sigma", "last_update"}:
            return [f"an HTR state that is not {{'pending_sigma': ..., 'last_update': ...}}: {state!r}"]
        problems = []
        sigma = state["pending_sigma"]
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < sigma <= 1):
            problems.append(f"a pending HTR σ that is not in (0, 1]: {sigma!r}")
        last = state["last_update"]
        shape = (self.num_params,)
        if last is not None and not (
            isinstance(last, torch.Tensor) and last.dtype.is_floating_point and tuple(last.shape) == shape
        ):
            got = f"shape {tuple(last.shape)} {last.dtype}" if isinstance(last, torch.Tensor) else type(last).__name__
            problems.append(f"an HTR last update that is not a float tensor of shape {shape}, got {got}")
        return problems

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (g' on the shared parameters' device and dtype)."""
        sigma = state["pending_sigma"]
        self.pending_sigma = None if sigma is None else float(sigma)
        last = state["last_update"]
        if last is not None and self._like is not None:
            last = last.to(device=self._like.device, dtype=self._like.dtype)
        self.last_update = None if last is None else last.clone()

    def close(self) -> None:
        """Detach from the optimizer (its hooks are removed; a pending HTR is dropped)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.pending_sigma = None
