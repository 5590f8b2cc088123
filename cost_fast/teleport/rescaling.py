"""Symmetry teleportation by group action (Zhao et al., "Symmetry Teleportation for Accelerated
Optimization", NeurIPS 2022), the teleport COST replaces with a learned adapter, here for the
symmetry that is exact and cheap in MLP backbones: positive rescaling of hidden units.

For two Linear layers of the backbone separated only by positively homogeneous activations
(ReLU, LeakyReLU: σ(λx) = λσ(x) for λ > 0; or nothing), every hidden unit k can be rescaled:

    W_in[k, :] ← e^{s_k} W_in[k, :],   b_in[k] ← e^{s_k} b_in[k],   W_out[:, k] ← e^{-s_k} W_out[:, k],

which leaves the network's function, and so every loss, unchanged exactly (in exact arithmetic;
to rounding in floating point). The teleport climbs the group to raise the gradient norm at the
same loss, as Zhao et al. do: gradient ascent on s of

    J(s) = log ‖∇_θ L(g_s · θ)‖²,   L = (1/K) Σ_i L_i on the current batch,

for ``steps`` steps of size ``lr`` (``RescaleConfig``; s = 0 at the start), then θ ← g_s · θ. The logarithm
makes the step independent of the scale of the gradients (∇ log J = ∇J / J). The per-task
gradients' conflict statistics are reported before and after. Frozen layers are never rescaled.
What it needs from the model: a shared backbone that is an ``nn.Sequential`` with at least two
trainable ``nn.Linear`` layers separated only by ReLU / LeakyReLU / Identity (or by nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from cost_fast.grads import TaskGradients
from cost_fast.kernels import stats_from_gram
from cost_fast.teleport.config import RescaleConfig
from cost_fast.teleport.perturbed import LossFn, losses_at

HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def rescalable_pairs(backbone: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(input layer, output layer) pairs whose hidden units can be rescaled (module docstring)."""
    if not isinstance(backbone, nn.Sequential):
        return []
    pairs = []
    layers = list(backbone)
    for i, first in enumerate(layers):
        if not isinstance(first, nn.Linear):
            continue
        for later in layers[i + 1 :]:
            if isinstance(later, nn.Linear):
                trainable = first.weight.requires_grad and later.weight.requires_grad
                if trainable and (first.bias is None or first.bias.requires_grad):
                    pairs.append((first, later))
                break
            if not isinstance(later, HOMOGENEOUS):
                break
    return pairs


def _check_plain_layers(model: nn.Module, backbone: nn.Module, pairs: list[tuple[nn.Linear, nn.Linear]]) -> None:
    """Refuse, before anything is changed, layers the rescaling would corrupt: a module or a
    parameter that appears twice in the backbone (rescaling one place rescales the other, so the
    function is no longer kept), a parametrized weight (``weight_norm``, ``parametrize``: the
    weight is computed, not stored) and layers outside ``model``."""
    modules = [id(m) for m in backbone.modules(remove_duplicate=False)]
    params = [id(p) for _, p in backbone.named_parameters(remove_duplicate=False)]
    if len(set(modules)) != len(modules) or len(set(params)) != len(params):
        raise ValueError(
            "the rescaling teleport needs a backbone whose layers and parameters appear once each; this one "
            "shares a module or a parameter between two places (a layer registered twice, tied weights)"
        )
    in_model = {id(p) for p in model.parameters()}
    name_of = {id(m): name for name, m in backbone.named_modules()}
    for layer in {id(m): m for pair in pairs for m in pair}.values():
        if parametrize.is_parametrized(layer) or not isinstance(layer.weight, nn.Parameter):
            raise ValueError(
                f"the rescaling teleport cannot act on the backbone's layer {name_of[id(layer)]!r} "
                f"({type(layer).__name__}): its weight is parametrized (weight_norm, "
                "torch.nn.utils.parametrize), so rescaling it would not keep the function; remove the "
                "parametrization or use the LoRA teleport"
            )
        if any(id(p) not in in_model for p in layer.parameters()):
            raise ValueError("the backbone's layers must be part of the model (backbone must be a submodule)")


@dataclasses.dataclass
class SymmetryResult:
    """What a group-action teleport did: ``deltas`` (θ' - θ, aligned with the backbone's
    trainable parameters), ``steps``, the objective J (log of the squared gradient norm) per step, the losses before and after on
    the current batch, and the conflict statistics before and after (min_i cos(g_i, g0) and the
    number of conflicting pairs, from the per-task gradients of the shared parameters)."""

    deltas: list[torch.Tensor]
    steps: int
    objective: list[float]
    losses_before: torch.Tensor
    losses_after: torch.Tensor
    conflicts_before: dict[str, float]
    conflicts_after: dict[str, float]


class RescalingTeleport:
    """Group-action teleport of a backbone's hidden-unit rescalings (module docstring).

    Args:
        model: the whole model (``loss_fn(model, batch)`` gives its K losses).
        backbone: its shared ``nn.Sequential`` backbone.
        config: ``RescaleConfig`` (steps, lr, max_log_scale; default its defaults).
    """

    def __init__(self, model: nn.Module, backbone: nn.Module, config: RescaleConfig | None = None) -> None:
        config = config if config is not None else RescaleConfig()
        if not isinstance(config, RescaleConfig):
            raise TypeError(f"config must be a RescaleConfig, got {type(config).__name__}")
        self.pairs = rescalable_pairs(backbone)
        if not self.pairs:
            raise ValueError(
                "the rescaling teleport needs an nn.Sequential backbone with two trainable nn.Linear layers "
                "separated only by ReLU, LeakyReLU or Identity"
            )
        _check_plain_layers(model, backbone, self.pairs)
        self.model, self.backbone, self.config = model, backbone, config
        self.steps, self.lr, self.max_log_scale = config.steps, config.lr, config.max_log_scale
        self.parameters = [p for p in backbone.parameters() if p.requires_grad]
        self._name = {id(p): n for n, p in model.named_parameters()}

    def _acted(self, s: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rescaled parameters g_s · θ, by name, differentiable in s."""
        moved: dict[str, torch.Tensor] = {}
        for (first, second), log_scale in zip(self.pairs, s):
            up, down = log_scale.exp(), (-log_scale).exp()
            w_in = moved.get(self._name[id(first.weight)], first.weight)
            moved[self._name[id(first.weight)]] = w_in * up[:, None]
            if first.bias is not None:
                b_in = moved.get(self._name[id(first.bias)], first.bias)
                moved[self._name[id(first.bias)]] = b_in * up
            w_out = moved.get(self._name[id(second.weight)], second.weight)
            moved[self._name[id(second.weight)]] = w_out * down[None, :]
        return moved

    def _conflicts(self, loss_fn: LossFn, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        losses = loss_fn(self.model, batch)
        G = TaskGradients(self.parameters, num_tasks=losses.shape[0]).compute(losses).double()
        stats = stats_from_gram(G @ G.T)
        summary = {
            "min_cos_mean": float(stats.cos_mean.min()),
            "conflicting_pairs": float(stats.num_conflicting_pairs),
            "mean_norm": float(stats.mean_norm),
        }
        return losses.detach(), summary

    def teleport(self, loss_fn: LossFn, batch: Any) -> SymmetryResult:
        """Climb the rescaling group on ``batch`` and move the backbone (module docstring)."""
        losses_before, before = self._conflicts(loss_fn, batch)
        s = [
            torch.zeros(first.out_features, dtype=first.weight.dtype, device=first.weight.device, requires_grad=True)
            for first, _ in self.pairs
        ]
        names = [self._name[id(p)] for p in self.parameters]
        history = []
        for _ in range(self.steps):
            moved = self._acted(s)
            current = {n: moved.get(n, p) for n, p in zip(names, self.parameters)}
            losses = losses_at(self.model, loss_fn, batch, current)
            grads = torch.autograd.grad(losses.mean(), list(current.values()), create_graph=True)
            objective = sum((g * g).sum() for g in grads).log()
            ascent = torch.autograd.grad(objective, s)
            with torch.no_grad():
                for log_scale, g in zip(s, ascent):
                    log_scale.add_(self.lr * g).clamp_(-self.max_log_scale, self.max_log_scale)
            history.append(objective.detach())
        with torch.no_grad():
            moved = self._acted(s)
            deltas = []
            for name, p in zip(names, self.parameters):
                new = moved.get(name)
                deltas.append(torch.zeros_like(p) if new is None else new - p)
                if new is not None:
                    p.copy_(new)
        losses_after, after = self._conflicts(loss_fn, batch)
        return SymmetryResult(
            deltas=deltas,
            steps=self.steps,
            objective=torch.stack(history).tolist(),
            losses_before=losses_before,
            losses_after=losses_after,
            conflicts_before=before,
            conflicts_after=after,
        )
