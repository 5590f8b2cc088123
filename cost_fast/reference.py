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
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cost_fast.kernels.perturb import sphere_noise
from cost_fast.lora import ADAPTED_TYPES
from cost_fast.teleport import (
    LossFn,
    TeleportConfig,
    loss_contour,
    losses_at,
    paper_radius_and_seed,
    paper_sharpness_term,
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
