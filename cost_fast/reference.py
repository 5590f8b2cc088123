"""Plain COST pieces, written the straightforward way the public code does them: the yardstick
the fast engine is profiled and tested against.

``reference_task_gradients``: K ``backward(retain_graph=True)`` calls, each followed by a Python
loop copying every parameter's ``.grad`` into column i of a P x K buffer (the offset
``sum(grad_dims[:cnt])`` recomputed per parameter).

Per teleport: wrap a deep copy of the model with ``peft.get_peft_model``; per adapter step and
per sharpness sample, deep-copy the wrapped model, ``merge_and_unload`` it, add noise to every
parameter tensor, evaluate; at the end ``merge_and_unload``. Same objective and reference
semantics as ``cost_fast.teleport`` (see there). In paper semantics, all n perturbed evaluations
are differentiated and the max taken over them (the fast path differentiates the arg-max only).

``ReferenceCOST``: the whole COST step built from these pieces, with M = G Gᵀ, the trigger and
σ computed in plain torch on concatenated vectors and HTR applied by hand, as the yardstick of
``cost_fast.cost.COST``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from cost_fast.aggregators.base import Aggregator
from cost_fast.kernels.perturb import sphere_noise
from cost_fast.lora import ADAPTED_TYPES
from cost_fast.teleport import (
    LossFn,
    TeleportConfig,
    loss_contour,
    losses_at,
    paper_radius_and_seed,
    paper_ratio_weights,
    paper_sharpness_term,
    reference_ratio_weights,
)


def reference_task_gradients(
    model: nn.Module, shared: list[torch.Tensor], losses: torch.Tensor, buffer: torch.Tensor
) -> torch.Tensor:
    """Fill ``buffer`` (P x K) with the per-task gradients of ``shared`` the public code's way."""
    grad_dims = [p.numel() for p in shared]
    for i in range(losses.shape[0]):
        model.zero_grad(set_to_none=True)
        losses[i].backward(retain_graph=True)
        buffer[:, i].fill_(0.0)
        for cnt, p in enumerate(shared):
            if p.grad is not None:
                beg = sum(grad_dims[:cnt])
                end = sum(grad_dims[: cnt + 1])
                buffer[beg:end, i].copy_(p.grad.reshape(-1))
    return buffer


def reference_teleport(
    model: nn.Module,
    backbone_name: str,
    loss_fn: LossFn,
    data: Iterable[Any],
    current_batch: Any,
    ratios: torch.Tensor,
    config: TeleportConfig | None = None,
    *,
    rank: int = 5,
    generator: torch.Generator | None = None,
    initial_lora_a: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Return a teleported copy of ``model`` (the input is not modified).

    ``backbone_name`` is the attribute holding the shared backbone (LoRA goes on its
    Linear/Conv layers). ``initial_lora_a`` sets the A matrices (in layer order) instead of
    peft's random initialization, so that a run can be compared with the fast engine's.
    """
    from peft import LoraConfig, get_peft_model

    config = config or TeleportConfig()
    model = copy.deepcopy(model)
    model.eval()
    backbone = getattr(model, backbone_name)
    targets = [f"{backbone_name}.{name}" for name, m in backbone.named_modules() if isinstance(m, ADAPTED_TYPES)]
    contour = loss_contour(model, loss_fn, data)
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    wrapped = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern))
    lora_a = [p for n, p in wrapped.named_parameters() if "lora_A" in n]
    if initial_lora_a is not None:
        with torch.no_grad():
            for p, value in zip(lora_a, initial_lora_a, strict=True):
                p.copy_(value)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    prefix = f"base_model.model.{backbone_name}."
    shared = [(n, p) for n, p in wrapped.named_parameters() if n.startswith(prefix) and "lora_" not in n]
    if config.semantics == "paper":
        radius, base_seed = paper_radius_and_seed([p for _, p in shared], config, generator)
    steps = 0
    for _ in range(config.rounds):
        for batch in data:
            losses = loss_fn(wrapped, batch)
            task_term = torch.stack([(losses[i] - contour[i]).abs() for i in range(len(losses))]).mean()
            unperturbed = loss_fn(wrapped, current_batch)
            if config.semantics == "paper":
                terms = []
                for j in range(config.num_samples):
                    noise = sphere_noise([p for _, p in shared], base_seed + steps * config.num_samples + j, radius)
                    moved = {n: p + e for (n, p), e in zip(shared, noise)}
                    terms.append(
                        paper_sharpness_term(unperturbed, losses_at(wrapped, loss_fn, current_batch, moved), ratios)
                    )
                sharp_term = torch.stack(terms).max()
            else:
                samples = []
                for _ in range(config.num_samples):
                    noisy = copy.deepcopy(wrapped).merge_and_unload()
                    for p in noisy.parameters():
                        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
                        p.data = p.data + noise * (config.noise_norm / torch.norm(noise))
                    perturbed = loss_fn(noisy, current_batch)
                    samples.append(
                        torch.stack([ratios[i] * (perturbed[i] - unperturbed[i]).abs() for i in range(len(perturbed))])
                    )
                    del noisy
                sharp_term = torch.max(torch.stack(samples), dim=0)[0].mean() / config.noise_norm
            objective = config.task_weight * task_term - config.sharpness_weight * sharp_term
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            steps += 1
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if config.max_steps is not None and steps >= config.max_steps:
            break
    return wrapped.merge_and_unload()


class ReferenceCOST:
    """COST's training step written the straightforward way (the public code's structure).

    Per ``step(losses, batch)``: G by ``reference_task_gradients``; M = G Gᵀ; norms, g0 and
    cos(g_i, g0) as separate torch expressions; the trigger (reference: min_i cos ≤ 0; paper: at
    least ⌈K/2⌉ negative cosines) read on the host; a teleport by ``reference_teleport`` whose
    weights are copied into the model, then σ = cos(Δθ, g') on concatenated vectors (g' the
    last update, or in paper semantics Gᵀw at the pre-teleport point) and HTR by hand: σ ≤ 0
    drops Adam's state, otherwise the betas are (σβ1, σβ2) for the next step only; otherwise
    the Gram-based ``base`` method's update (heads: ∇ Σ w_i L_i, backbone: Gᵀw).

    Args mirror ``COST``'s; ``backbone_name`` names the shared submodule (an attribute of
    ``model``). ``initial_lora_a`` (attribute, settable) fixes the A matrices of the next
    teleport's adapter instead of peft's random ones, to compare a run with ``COST``'s.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone_name: str,
        base: Aggregator,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        teleport_data: Iterable[Any],
        *,
        semantics: Literal["reference", "paper"] = "reference",
        start_step: int = 0,
        max_teleports_per_epoch: int = 1,
        rank: int = 5,
        teleport: TeleportConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(base, Aggregator) or base.kind != "gram":
            raise TypeError("the reference COST takes a Gram-based aggregator as its base method")
        self.model, self.backbone_name, self.base, self.optimizer = model, backbone_name, base, optimizer
        self.loss_fn, self.teleport_data, self.semantics = loss_fn, teleport_data, semantics
        self.start_step, self.max_teleports_per_epoch, self.rank = start_step, max_teleports_per_epoch, rank
        lr = optimizer.param_groups[0]["lr"]
        self.config = teleport or TeleportConfig.for_semantics(semantics, lr=lr)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.shared = list(getattr(model, backbone_name).parameters())
        shared_ids = {id(p) for p in self.shared}
        self.heads = [p for p in model.parameters() if id(p) not in shared_ids]
        self.initial_lora_a: list[torch.Tensor] | None = None
        self.step_count, self.teleports_this_epoch = 0, 0
        self.last_update: torch.Tensor | None = None
        self._saved_betas: list[tuple[float, float]] | None = None

    def end_epoch(self) -> None:
        """Reset the per-epoch teleport count."""
        self.teleports_this_epoch = 0

    def step(self, losses: torch.Tensor, batch: Any) -> dict[str, Any]:
        """One step; returns {"teleported": bool, "sigma": float | None}."""
        shared = self.shared
        buffer = torch.zeros(
            sum(p.numel() for p in shared), losses.shape[0], dtype=shared[0].dtype, device=shared[0].device
        )
        G = reference_task_gradients(self.model, shared, losses, buffer).T
        K = G.shape[0]
        M = G @ G.T
        norms = M.diagonal().sqrt()
        g0 = G.mean(dim=0)
        cos = (G @ g0) / (norms * g0.norm())
        if self.semantics == "reference":
            fires = bool(cos.min() <= 0)
        else:
            fires = int((cos < 0).sum()) >= math.ceil(K / 2)
        allowed = self.step_count >= self.start_step and self.teleports_this_epoch < self.max_teleports_per_epoch
        self.step_count += 1
        if fires and allowed:
            return {"teleported": True, "sigma": self._teleport(G, M, norms, batch)}
        w = self.base.weights(M)
        self.optimizer.zero_grad(set_to_none=True)
        if self.heads:
            (losses @ w.to(losses)).backward(inputs=self.heads)
        self.last_update = G.T @ w.to(G)
        offset = 0
        for p in shared:
            p.grad = self.last_update[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        if self._saved_betas is not None:
            for group, betas in zip(self.optimizer.param_groups, self._saved_betas):
                group["betas"] = betas
            self._saved_betas = None
        return {"teleported": False, "sigma": None}

    def _teleport(self, G: torch.Tensor, M: torch.Tensor, norms: torch.Tensor, batch: Any) -> float | None:
        if self.semantics == "paper":
            self.last_update = G.T @ self.base.weights(M).to(G)
            ratios = paper_ratio_weights(norms)
        else:
            ratios = reference_ratio_weights(norms)
        before = torch.cat([p.detach().reshape(-1) for p in self.shared])
        moved = reference_teleport(
            self.model,
            self.backbone_name,
            self.loss_fn,
            self.teleport_data,
            batch,
            ratios,
            self.config,
            rank=self.rank,
            generator=self.generator,
            initial_lora_a=self.initial_lora_a,
        )
        with torch.no_grad():
            for p, q in zip(self.shared, getattr(moved, self.backbone_name).parameters(), strict=True):
                p.copy_(q)
        self.teleports_this_epoch += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.last_update is None:
            return None
        delta = torch.cat([p.detach().reshape(-1) for p in self.shared]) - before
        denom = float(delta.norm() * self.last_update.norm())
        sigma = float(delta @ self.last_update) / denom if denom > 0 else 0.0
        if sigma <= 0:
            self.optimizer.state.clear()
        else:
            self._saved_betas = [tuple(group["betas"]) for group in self.optimizer.param_groups]
            for group, (b1, b2) in zip(self.optimizer.param_groups, self._saved_betas):
                group["betas"] = (sigma * b1, sigma * b2)
        return sigma
