"""Historical trajectory reuse (HTR, COST Eqs. 12-13) for Adam-family optimizers.

After a teleport by Δθ, Adam's moments describe a trajectory the model has left. COST keeps them
in proportion to how well the teleport agrees with the last update direction g':

    σ = cos(Δθ, g')                                   (Eq. 12)
    m_t = σβ1 m_(t-1) + (1 - σβ1) g_t                  (Eq. 13)
    v_t = σβ2 v_(t-1) + (1 - σβ2) g_t²

for the one step after the teleport, then σ = 1 again. Eq. 13 is exactly Adam's moment update
with betas (σβ1, σβ2), so HTR is applied by setting those betas for one ``optimizer.step()``
(restored by a step post-hook): the optimizer's own fused multi-tensor step does the update,
and the step's bias correction uses the same betas, as in the public COST code. With σ ≤ 0
the public code starts a brand-new Adam (state cleared), which ``apply_htr`` does too.
SGD and other optimizers without ``betas`` are not supported (HTR is then off).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def apply_htr(optimizer: torch.optim.Optimizer, sigma: float | torch.Tensor) -> str:
    """Arm HTR on ``optimizer`` for its next step; returns what was done.

    σ ≤ 0: the optimizer state is cleared (a fresh Adam), ``"reset"``. Otherwise every param
    group's betas become (σβ1, σβ2) for exactly one ``step()`` and are then restored,
    ``"modulated"``. Arming twice before a step keeps the original betas for the restore.
    """
    if not supports_htr(optimizer):
        raise TypeError(f"HTR needs Adam or AdamW, got {type(optimizer).__name__}")
    sigma = float(sigma)
    if not sigma == sigma or not -1.0 - 1e-6 <= sigma <= 1.0 + 1e-6:
        raise ValueError(f"sigma is a cosine in [-1, 1], got {sigma}")
    if sigma <= 0:
        optimizer.state.clear()
        _restore_betas(optimizer)
        return "reset"
    sigma = min(sigma, 1.0)
    saved = getattr(optimizer, "_htr_saved_betas", None)
    if saved is None:
        saved = [tuple(group["betas"]) for group in optimizer.param_groups]
        optimizer._htr_saved_betas = saved
        optimizer._htr_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: _restore_betas(opt))
    for group, (b1, b2) in zip(optimizer.param_groups, saved):
        group["betas"] = (sigma * b1, sigma * b2)
    return "modulated"


def _restore_betas(optimizer: torch.optim.Optimizer) -> None:
    saved = getattr(optimizer, "_htr_saved_betas", None)
    if saved is None:
        return
    for group, betas in zip(optimizer.param_groups, saved):
        group["betas"] = betas
    optimizer._htr_hook.remove()
    del optimizer._htr_saved_betas, optimizer._htr_hook
