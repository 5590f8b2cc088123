"""The yardstick: COST written the straightforward way, from the equations, sharing no helper with
the fast engine it checks (``cost_fast.cost``, ``cost_fast.teleport``, ``cost_fast.teleport.semantics``),
so that a mistake in one of the fast pieces cannot pass the equivalence tests. It reads only the
numbers of a ``Semantics`` (its name, weights, ν or δ/‖θ‖, LoRA alpha, guard default) and a
``TeleportConfig``.

``yardstick_task_gradients``: K ``backward(retain_graph=True)`` calls, each followed by a Python
loop copying every parameter's ``.grad`` into column i of a P x K buffer (as the public code).

``yardstick_teleport``, per teleport (LoRA on the trainable Linear/Conv layers of the backbone):

    L*_i  = (1/|D|) Σ_b L_i(θ; b)                                   (float64)
    A     ~ U(-1/√fan_in, 1/√fan_in) from the generator, layer by layer; B = 0
    L_t   = (1/K) Σ_i |L_i(θ+Δθ; b) - L*_i|
    public: R_i = K (1 - ‖g_i‖/Σ_j‖g_j‖); per sample j a deep copy, ``merge_and_unload``, every
            parameter tensor + ν z/‖z‖ (z drawn from the generator in parameter order);
            L_g = (1/K) Σ_i max_j R_i |L_i(θ+Δθ+ε_j) - L_i(θ+Δθ)| / ν (perturbed losses constant)
    paper:  R = K softmax(Σ_j‖g_j‖/‖g_i‖); δ = relative_radius·‖θ_shared‖; seed s0 drawn from the
            generator; sample j of step t: z from a generator seeded s0 + t·n + j over the
            shared parameters, ε_j = δ z/‖z‖; L_g = max_j |(1/K) Σ_i R_i (L_i(θ+Δθ+ε_j) -
            L_i(θ+Δθ))|, all n samples differentiated
    L_lora = a L_t - b L_g by Adam, ``rounds`` passes; then ``merge_and_unload``;
    guard: roll back if some L_i(θ+Δθ) - L*_i > tol·|L*_i| or anything is non-finite.

``YardstickCOST``: the whole step: G by ``yardstick_task_gradients``; M = G Gᵀ, norms, g0 and
cos(g_i, g0) as separate torch expressions; the trigger (public: min_i cos ≤ 0; paper: at least
⌈K/2⌉ negative cosines); the teleport; σ = cos(Δθ, g') on concatenated vectors (g' the last
update, or in paper semantics Gᵀw at the pre-teleport point); HTR by hand (σ ≤ 0 drops Adam's
state, else betas (σβ1, σβ2) for the next step only); otherwise the Gram-based method's update
(heads: ∇ Σ w_i L_i, backbone: Gᵀw).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cost_fast.aggregators.base import Aggregator
from cost_fast.teleport import TeleportConfig
from cost_fast.teleport.semantics import Semantics, get_semantics

LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def yardstick_task_gradients(
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


class _Losses(nn.Module):
    """forward(batch) = loss_fn(model, batch), so that parameters can be substituted."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def yardstick_teleport(
    model: nn.Module,
    backbone_name: str,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Iterable[Any],
    current_batch: Any,
    *,
    norms: torch.Tensor,
    semantics: str | Semantics,
    config: TeleportConfig,
    lr: float,
    rank: int = 5,
    generator: torch.Generator,
) -> tuple[nn.Module | None, int]:
    """Return (a teleported copy of ``model``, or None when the guard rolls back; the number of
    adapter steps taken); the input is not modified.
    ``norms`` are the task gradient norms ‖g_i‖ (keyword-only: ``teleport`` takes the ratio
    weights R in their place); ``backbone_name`` the attribute holding the shared backbone;
    ``semantics`` a name or a ``Semantics``."""
    from peft import LoraConfig, get_peft_model

    semantics = get_semantics(semantics)
    if not isinstance(config, TeleportConfig):
        raise TypeError(f"config must be a TeleportConfig, got {type(config).__name__}")

    model = copy.deepcopy(model)
    model.eval()
    K = norms.shape[0]
    if semantics.name == "public":
        ratios = K * (1 - norms / norms.sum())
    else:
        ratios = K * torch.softmax(norms.sum() / norms, dim=0)
    backbone = getattr(model, backbone_name)
    targets = [
        f"{backbone_name}.{name}"
        for name, m in backbone.named_modules()
        if isinstance(m, LORA_TYPES) and m.weight.requires_grad
    ]
    trainable = {f"{backbone_name}.{name}" for name, p in backbone.named_parameters() if p.requires_grad}
    with torch.no_grad():
        batches = list(data)
        contour = sum(loss_fn(model, b).double() for b in batches) / len(batches)
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    fork = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=fork):  # peft's own initialization is overwritten below
        lora = LoraConfig(r=rank, lora_alpha=semantics.lora_alpha, target_modules=pattern)
        wrapped = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_A" in name:
                bound = 1 / math.sqrt(p.shape[1] * math.prod(p.shape[2:]))
                p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device) * 2 * bound - bound)
    adapter = [p for name, p in wrapped.named_parameters() if "lora_" in name]
    optimizer = torch.optim.Adam(adapter, lr=lr)
    prefix = "base_model.model."
    shared = [
        (name, p)
        for name, p in wrapped.named_parameters()
        if "lora_" not in name and name[len(prefix) :].replace(".base_layer", "") in trainable
    ]
    n = config.num_samples
    if semantics.name == "paper":
        radius = semantics.relative_radius * float(torch.sqrt(sum((p.detach() ** 2).sum() for _, p in shared)))
        device = generator.device
        base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
    steps = 0
    budget = config.max_steps if config.max_steps is not None else float("inf")
    for _ in range(config.rounds):
        for batch in batches:
            if steps >= budget:
                break
            if semantics.name == "paper":
                unperturbed = loss_fn(wrapped, current_batch)
                terms = []
                for j in range(n):
                    gen = torch.Generator(device=shared[0][1].device).manual_seed(base_seed + steps * n + j)
                    z = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for _, p in shared]
                    z_norm = torch.sqrt(sum((t**2).sum() for t in z))
                    moved = {name: p + radius * t / z_norm for (name, p), t in zip(shared, z)}
                    perturbed = torch.func.functional_call(
                        _Losses(wrapped, loss_fn), {f"model.{k}": v for k, v in moved.items()}, (current_batch,)
                    )
                    terms.append((ratios * (perturbed - unperturbed)).sum().div(K).abs())
                sharp_term = torch.stack(terms).max()
            else:
                samples = []
                for j in range(n):
                    noisy = copy.deepcopy(wrapped).merge_and_unload()
                    if semantics.noise == "flat" and j == 0:  # z of all n samples and parameters in one draw
                        first, size = next(noisy.parameters()), sum(p.numel() for p in noisy.parameters())
                        z = torch.randn((n, size), generator=generator, dtype=first.dtype, device=first.device)
                    start = 0
                    for p in noisy.parameters():
                        if semantics.noise == "flat":
                            noise = z[j, start : start + p.numel()].view(p.shape)
                            start += p.numel()
                        else:
                            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
                        p.data = p.data + noise * (semantics.noise_norm / torch.norm(noise))
                    with torch.no_grad():
                        samples.append(loss_fn(noisy, current_batch))
                    del noisy
                unperturbed = loss_fn(wrapped, current_batch)
                per_task = [max(ratios[i] * (sample[i] - unperturbed[i]).abs() for sample in samples) for i in range(K)]
                sharp_term = torch.stack(per_task).mean() / semantics.noise_norm
            losses = loss_fn(wrapped, batch)
            task_term = torch.stack([(losses[i] - contour[i]).abs() for i in range(K)]).mean()
            objective = semantics.task_weight * task_term - semantics.sharpness_weight * sharp_term
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            steps += 1
        if steps >= budget:
            break
    moved_model = wrapped.merge_and_unload()
    if semantics.default_guard if config.guard is None else config.guard:
        with torch.no_grad():
            after = sum(loss_fn(moved_model, b).double() for b in batches) / len(batches)
        rose = any(float(after[i] - contour[i]) > config.guard_tolerance * abs(float(contour[i])) for i in range(K))
        if rose or not bool(torch.isfinite(after).all()):
            return None, steps
    return moved_model, steps


class YardstickCOST:
    """COST's training step written the straightforward way (module docstring).

    Args mirror ``COST``'s; ``backbone_name`` names the shared submodule (an attribute of
    ``model``); ``semantics`` is a name or a ``Semantics`` (only its numbers are read); the base
    method must be Gram-based.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone_name: str,
        base: Aggregator,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        teleport_data: Iterable[Any],
        semantics: str | Semantics,
        teleport: TeleportConfig | None = None,
        start_step: int = 0,
        max_teleports_per_epoch: int = 1,
        rank: int = 5,
        seed: int = 0,
    ) -> None:
        if not isinstance(base, Aggregator) or base.kind != "gram":
            raise TypeError("the yardstick COST takes a Gram-based aggregator as its base method")
        self.model, self.backbone_name, self.base, self.optimizer = model, backbone_name, base, optimizer
        self.loss_fn, self.teleport_data, self.semantics = loss_fn, teleport_data, get_semantics(semantics)
        self.start_step, self.max_teleports_per_epoch, self.rank = start_step, max_teleports_per_epoch, rank
        self.config = teleport or TeleportConfig()
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.shared = [p for p in getattr(model, backbone_name).parameters() if p.requires_grad]
        shared_ids = {id(p) for p in getattr(model, backbone_name).parameters()}
        self.heads = [p for p in model.parameters() if id(p) not in shared_ids]
        self.step_count, self.teleports_this_epoch = 0, 0
        self.teleport_steps = 0  # adapter steps over the run (benchmarks check equal work with it)
        self.last_update: torch.Tensor | None = None
        self._saved_betas: list[tuple[float, float]] | None = None

    def end_epoch(self) -> None:
        """Reset the per-epoch teleport count."""
        self.teleports_this_epoch = 0

    def step(self, losses: torch.Tensor, batch: Any) -> dict[str, Any]:
        """One step; returns {"teleported": bool, "rolled_back": bool, "sigma": float | None}."""
        shared = self.shared
        buffer = torch.zeros(
            sum(p.numel() for p in shared), losses.shape[0], dtype=shared[0].dtype, device=shared[0].device
        )
        G = yardstick_task_gradients(self.model, shared, losses, buffer).T
        K = G.shape[0]
        M = G @ G.T
        norms = M.diagonal().sqrt()
        g0 = G.mean(dim=0)
        cos = (G @ g0) / (norms * g0.norm())
        trigger = self.semantics.trigger or ("weak" if self.semantics.name == "public" else "majority")
        if trigger == "weak":  # some task conflicts with the mean
            fires = bool(cos.min() <= 0)
        elif trigger == "always":  # every step, unless M is not finite
            fires = bool(torch.isfinite(M).all())
        elif trigger == "dominated":  # Eq. 3: the task of the smallest gradient conflicts with the mean
            fires = bool(cos[int(torch.argmin(norms))] < 0)
        else:  # Eq. 4: at least half the tasks conflict with the mean
            fires = int((cos < 0).sum()) >= math.ceil(K / 2)
        allowed = self.step_count >= self.start_step and self.teleports_this_epoch < self.max_teleports_per_epoch
        self.step_count += 1
        if fires and allowed:
            return self._teleport(G, M, norms, batch)
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
        return {"teleported": False, "rolled_back": False, "sigma": None}

    def _teleport(self, G: torch.Tensor, M: torch.Tensor, norms: torch.Tensor, batch: Any) -> dict[str, Any]:
        if self.semantics.name == "paper":
            self.last_update = G.T @ self.base.weights(M).to(G)
        before = torch.cat([p.detach().reshape(-1) for p in self.shared])
        moved, steps = yardstick_teleport(
            self.model,
            self.backbone_name,
            self.loss_fn,
            self.teleport_data,
            batch,
            norms=norms,
            semantics=self.semantics,
            config=self.config,
            lr=self.config.lr if self.config.lr is not None else self.optimizer.param_groups[0]["lr"],
            rank=self.rank,
            generator=self.generator,
        )
        rolled_back = moved is None
        self.teleport_steps += steps
        if not rolled_back:
            mine = getattr(self.model, self.backbone_name).parameters()
            theirs = getattr(moved, self.backbone_name).parameters()
            with torch.no_grad():
                for p, q in zip(mine, theirs, strict=True):
                    if p.requires_grad:
                        p.copy_(q)
        self.teleports_this_epoch += 1
        self.optimizer.zero_grad(set_to_none=True)
        if rolled_back or self.last_update is None:
            return {"teleported": not rolled_back, "rolled_back": rolled_back, "sigma": None}
        delta = torch.cat([p.detach().reshape(-1) for p in self.shared]) - before
        denom = float(delta.norm() * self.last_update.norm())
        sigma = float(delta @ self.last_update) / denom if denom > 0 else 0.0
        if sigma <= 0:
            self.optimizer.state.clear()
        else:
            self._saved_betas = [tuple(group["betas"]) for group in self.optimizer.param_groups]
            for group, (b1, b2) in zip(self.optimizer.param_groups, self._saved_betas):
                group["betas"] = (sigma * b1, sigma * b2)
        return {"teleported": True, "rolled_back": False, "sigma": sigma}
