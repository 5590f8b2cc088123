"""COST's teleport: train the LoRA adapter to a loss-equivalent, sharper point, merge, check.

Two semantics. Reference (what the public COST code does, the default):

    L*_i   = mean over the teleport data of L_i(θ)                         (before any step)
    L_t    = (1/K) Σ_i |L_i(θ+Δθ; b) - L*_i|                               (teleport batch b)
    L_g    = (1/K) Σ_i max_j R_i |L_i(θ+Δθ+ε_j; x) - L_i(θ+Δθ; x)| / ν      (current batch x)
    L_lora = 10 L_t - 0.5 L_g,   minimized by Adam over the adapter, ``rounds`` passes over the data

with R_i = K (1 - ‖g_i‖ / Σ_j ‖g_j‖), and ε_j Gaussian noise drawn for every parameter tensor
of the model (adapter excluded), each tensor's noise scaled to norm ν = 1e-4. The perturbed
losses are constants (the public code evaluates them on deep copies), so L_g's gradient flows
through L_i(θ+Δθ; x) alone.

Paper (Eqs. 7-11): R = K softmax(Σ_j‖g_j‖/‖g_i‖), L_lora = L_t - 0.1 L_g with

    L_g = max_j | (1/K) Σ_i R_i [L_i(θ+Δθ+ε_j; x) - L_i(θ+Δθ; x)] |,

ε_j Gaussian over the shared parameters scaled to the sphere of radius δ
(``cost_fast.kernels.perturb``: Philox noise generated inside a Triton kernel on CUDA), both
terms differentiable. The gradient of a max flows through its arg-max alone, so the fast path
evaluates the n samples without autograd and differentiates only the arg-max sample (the
reference differentiates all n: same gradient, n-fold less backward work). ε_j is regenerated
from its own seed rather than stored. δ defaults to 1e-3·‖θ_shared‖ (the paper gives no value):
a relative radius keeps the loss differences far above float32 rounding whatever the weights'
scale, and 0.1% keeps the probe local.

What we do differently, for speed, with the same result: the adapter is injected once
(``TeleportAdapter``), the perturbed losses run under ``torch.no_grad()`` and never copy the
model. With ``samples_per_pass = 1`` (default) each sample's noise is added to the parameters in
place by multi-tensor (``torch._foreach_*``) ops and undone by copying the saved values back
(bit-exact). With ``samples_per_pass = s > 1``, s samples are evaluated in one forward pass:
``torch.func.vmap`` over s stacked perturbed copies of the perturbed parameters (not of the
model: s times their memory, freed after the pass), which turns s small launches of every layer
into one batched one. A guard evaluates the teleport data again after the merge and rolls back
(bit-exactly) if any task's mean loss rose by more than ``guard_tolerance`` relatively, or if
anything is non-finite.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cost_fast.kernels.perturb import sphere_noise, sphere_perturb_
from cost_fast.lora import TeleportAdapter

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclasses.dataclass
class TeleportConfig:
    """Settings of one teleport (reference semantics defaults).

    Attributes:
        semantics: "reference" or "paper" (module docstring); ``TeleportConfig.paper()`` sets
            the paper's weights too.
        lr: Adam learning rate of the adapter (the public code uses the model's).
        rounds: passes over the teleport data (``tele_round``, default 2).
        max_steps: optional budget of adapter steps (stops the passes early).
        num_samples: n perturbations for L_g (default 5).
        noise_norm: ν, the norm of each parameter tensor's noise (default 1e-4).
        task_weight, sharpness_weight: the objective's 10 and 0.5.
        guard_tolerance: relative rise of any task's mean loss that triggers a rollback (0.05).
        guard: evaluate the teleport data after the merge and roll back on a rise (default
            True; False skips that pass, as the public code, and never rolls back).
        relative_radius: paper semantics: δ / ‖θ_shared‖ (default 1e-3).
        samples_per_pass: perturbed samples evaluated together in one vmapped forward pass
            (default 1: one pass per sample, in place). Larger values cost that many copies of
            the perturbed parameters; a loss that ``vmap`` cannot trace falls back to 1.
    """

    semantics: str = "reference"
    lr: float = 1e-3
    rounds: int = 2
    max_steps: int | None = None
    num_samples: int = 5
    noise_norm: float = 1e-4
    task_weight: float = 10.0
    sharpness_weight: float = 0.5
    guard_tolerance: float = 0.05
    guard: bool = True
    relative_radius: float = 1e-3
    samples_per_pass: int = 1

    @classmethod
    def paper(cls, **overrides: Any) -> TeleportConfig:
        """The paper's settings: L_lora = L_t - 0.1 L_g (Eq. 11), δ = 1e-3·‖θ_shared‖."""
        return cls(**{"semantics": "paper", "task_weight": 1.0, "sharpness_weight": 0.1, **overrides})

    @classmethod
    def for_semantics(cls, semantics: str, **overrides: Any) -> TeleportConfig:
        """The default settings of ``semantics`` ("reference" or "paper"), with ``overrides``."""
        return cls.paper(**overrides) if semantics == "paper" else cls(semantics=semantics, **overrides)

    def __post_init__(self) -> None:
        if self.semantics not in ("reference", "paper"):
            raise ValueError(f"semantics must be 'reference' or 'paper', got {self.semantics!r}")
        if not self.relative_radius > 0:
            raise ValueError(f"relative_radius must be > 0, got {self.relative_radius!r}")
        for name in ("lr", "noise_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("rounds", "num_samples", "samples_per_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1 or None, got {self.max_steps}")
        if not self.guard_tolerance >= 0:
            raise ValueError(f"guard_tolerance must be ≥ 0, got {self.guard_tolerance}")


@dataclasses.dataclass
class TeleportResult:
    """What a teleport did. ``deltas`` is Δθ aligned with the adapter's base parameters
    (all zeros after a rollback); ``task_terms``/``sharpness_terms`` are L_t and L_g per step;
    ``contour_before``/``contour_after`` the mean task losses over the teleport data."""

    deltas: list[torch.Tensor]
    steps: int
    task_terms: list[float]
    sharpness_terms: list[float]
    contour_before: torch.Tensor
    contour_after: torch.Tensor | None  # None when the guard is off
    rolled_back: bool


def reference_ratio_weights(norms: torch.Tensor) -> torch.Tensor:
    """R_i = K (1 - ‖g_i‖ / Σ_j ‖g_j‖) (the public code's weights; smaller gradients weigh more)."""
    K = norms.shape[0]
    total = norms.sum()
    return K * (1 - norms / torch.where(total > 0, total, torch.ones_like(total)))


def paper_ratio_weights(norms: torch.Tensor) -> torch.Tensor:
    """R = K softmax([Σ_j ‖g_j‖ / ‖g_i‖]_i) (Eq. 10; a zero norm counts as 1e-30)."""
    K = norms.shape[0]
    return K * torch.softmax(norms.sum() / norms.clamp_min(1e-30), dim=0)


def paper_radius_and_seed(
    shared: list[torch.Tensor], config: TeleportConfig, generator: torch.Generator | None
) -> tuple[float, int]:
    """δ = relative_radius·‖θ_shared‖ at the start of a teleport, and the base seed of its
    perturbations (one draw from ``generator``; sample j of step t uses seed base + t·n + j)."""
    norm = float(torch.stack(torch._foreach_norm([p.detach() for p in shared])).square().sum().sqrt())
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    return config.relative_radius * norm, seed


def paper_sharpness_term(unperturbed: torch.Tensor, perturbed: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """|(1/K) Σ_i R_i [L_i(θ+Δθ+ε) - L_i(θ+Δθ)]| for (…, K) perturbed losses (the term Eq. 9 maximizes)."""
    return (ratios * (perturbed - unperturbed)).mean(dim=-1).abs()


@torch.no_grad()
def loss_contour(model: nn.Module, loss_fn: LossFn, data: Iterable[Any]) -> torch.Tensor:
    """Mean of the task losses over ``data`` (no grad; the caller sets train/eval mode)."""
    total, count = None, 0
    for batch in data:
        losses = loss_fn(model, batch).detach().double()
        total = losses if total is None else total + losses
        count += 1
    if count == 0:
        raise ValueError("the teleport data yielded no batch")
    return (total / count).float()


def reference_noise(
    params: list[torch.Tensor], noise_norm: float, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """ε = [ν z_k / ‖z_k‖]_k with z_k ~ N(0, I) of each tensor's shape, drawn in parameter order
    from ``generator`` (the public code's order); the norms and scaling are multi-tensor ops."""
    noise = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p in params]
    if not noise:
        return noise
    scales = torch._foreach_reciprocal(torch._foreach_norm(noise))
    torch._foreach_mul_(scales, noise_norm)
    torch._foreach_mul_(noise, scales)
    return noise


def batched_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    named: list[tuple[str, torch.Tensor]],
    noise: list[list[torch.Tensor]],
) -> torch.Tensor:
    """(s, K) task losses at the s points θ + ε_j (``noise[j]`` aligned with ``named``) in one
    ``vmap``-ed forward pass, without grad; the model is untouched."""
    stacked = {
        f"model.{name}": p.detach() + torch.stack([eps[k] for eps in noise]) for k, (name, p) in enumerate(named)
    }
    wrapper = _LossOf(model, loss_fn)

    def losses(substitutes: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, substitutes, (batch,), strict=False)

    with torch.no_grad():
        return torch.func.vmap(losses, randomness="different")(stacked)


def sample_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    named: list[tuple[str, torch.Tensor]],
    draws: list[Callable[[], list[torch.Tensor]]],
    samples_per_pass: int,
) -> torch.Tensor:
    """(n, K) task losses at θ + ε_j for the n noise draws ``draws[j]()`` (each a list aligned
    with ``named``), without grad, ``samples_per_pass`` samples per forward pass.

    One per pass: ε_j is added in place and the saved values copied back, so the parameters
    end bit-exactly where they started. More: ``batched_losses``; if ``vmap`` cannot run the
    loss (e.g. it calls ``.item()``), a warning is given and the remaining samples run one per
    pass. Draws are made in order either way, so the noise is the same.
    """
    params = [p for _, p in named]
    rows: list[torch.Tensor] = []
    j = 0
    while samples_per_pass > 1 and j < len(draws):
        chunk = [draw() for draw in draws[j : j + samples_per_pass]]
        j += len(chunk)
        try:
            rows.append(batched_losses(model, loss_fn, batch, named, chunk))
        except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to the plain loop
            warnings.warn(
                f"samples_per_pass > 1 needs a loss that torch.func.vmap can run ({type(err).__name__}: {err}); "
                "evaluating one sample per pass",
                RuntimeWarning,
                stacklevel=3,
            )
            adds = [lambda e=e: torch._foreach_add_(params, e) for e in chunk]
            rows.append(in_place_losses(model, loss_fn, batch, params, adds))
            samples_per_pass = 1
    if j < len(draws):
        adds = [lambda draw=draw: torch._foreach_add_(params, draw()) for draw in draws[j:]]
        rows.append(in_place_losses(model, loss_fn, batch, params, adds))
    return torch.cat(rows)


def in_place_losses(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[torch.Tensor],
    perturbations: list[Callable[[], Any]],
) -> torch.Tensor:
    """(n, K) task losses, one forward pass per perturbation, without grad: each callable
    perturbs ``params`` in place (e.g. adds its noise), the losses are evaluated, and the saved
    values are copied back, so the parameters end bit-exactly where they started (also on error)."""
    saved = [p.detach().clone() for p in params]
    rows = []
    with torch.no_grad():
        for perturb in perturbations:
            try:
                perturb()
                rows.append(loss_fn(model, batch).detach())
            finally:
                torch._foreach_copy_(params, saved)
    return torch.stack(rows)


def perturbed_losses(
    model: nn.Module,
    named: list[tuple[str, torch.Tensor]],
    loss_fn: LossFn,
    batch: Any,
    num_samples: int,
    noise_norm: float,
    generator: torch.Generator | None,
    samples_per_pass: int = 1,
) -> torch.Tensor:
    """(n, K) task losses at n perturbations θ + ε_j of the reference semantics
    (``reference_noise``: each parameter tensor's noise of norm ν), without grad; the
    parameters end bit-exactly where they started."""
    params = [p for _, p in named]
    draws = [lambda: reference_noise(params, noise_norm, generator)] * num_samples
    return sample_losses(model, loss_fn, batch, named, draws, samples_per_pass)


def reference_sharpness(
    unperturbed: torch.Tensor, perturbed: torch.Tensor, ratios: torch.Tensor, noise_norm: float
) -> torch.Tensor:
    """L_g = mean_i max_j R_i |L_i(θ+Δθ+ε_j) - L_i(θ+Δθ)| / ν from the (K,) unperturbed losses
    (differentiable) and the (n, K) perturbed ones (constants)."""
    return (ratios * (perturbed - unperturbed).abs()).max(dim=0).values.mean() / noise_norm


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can substitute
    parameters for a loss that calls more than the model's ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def losses_at(model: nn.Module, loss_fn: LossFn, batch: Any, substitutes: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task losses with some parameters (by name in ``model``) replaced by other tensors,
    out of place: differentiable through those tensors, the model itself untouched."""
    renamed = {f"model.{name}": t for name, t in substitutes.items()}
    return torch.func.functional_call(_LossOf(model, loss_fn), renamed, (batch,), strict=False)


def paper_sharpness(
    model: nn.Module,
    shared: list[tuple[str, torch.Tensor]],
    loss_fn: LossFn,
    batch: Any,
    ratios: torch.Tensor,
    seeds: list[int],
    radius: float,
    samples_per_pass: int = 1,
) -> torch.Tensor:
    """L_g of the paper semantics, differentiable, with one differentiable perturbed evaluation.

    All n samples are evaluated under no_grad (ε_j added in place by the Philox kernel and
    removed bit-exactly, or ``samples_per_pass`` at a time by ``sample_losses``); only the
    arg-max sample is then evaluated again, through ``torch.func.functional_call`` with
    θ + ε_j* as out-of-place tensors, so the adapter receives the same gradient as from
    differentiating all n.
    """
    params = [p for _, p in shared]
    with torch.no_grad():
        base = loss_fn(model, batch)
        if samples_per_pass > 1:
            draws = [lambda seed=seed: sphere_noise(params, seed, radius) for seed in seeds]
            perturbed = sample_losses(model, loss_fn, batch, shared, draws, samples_per_pass)
        else:  # in place, by the Philox kernel: no noise tensor is ever materialized
            perturbs = [lambda seed=seed: sphere_perturb_(params, seed, radius) for seed in seeds]
            perturbed = in_place_losses(model, loss_fn, batch, params, perturbs)
        best = int(paper_sharpness_term(base, perturbed, ratios).argmax())
    unperturbed = loss_fn(model, batch)
    noise = sphere_noise(params, seeds[best], radius)
    perturbed = losses_at(model, loss_fn, batch, {name: p + e for (name, p), e in zip(shared, noise)})
    return paper_sharpness_term(unperturbed, perturbed, ratios)


def teleport(
    model: nn.Module,
    adapter: TeleportAdapter,
    loss_fn: LossFn,
    data: Iterable[Any],
    current_batch: Any,
    ratios: torch.Tensor,
    config: TeleportConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> TeleportResult:
    """One COST teleport of ``model``'s shared backbone (``config.semantics``, module docstring).

    Args:
        model: the whole multi-task model (``loss_fn(model, batch)`` gives its K losses).
        adapter: the ``TeleportAdapter`` injected into the shared backbone.
        data: the teleport data, iterated 2 + ``config.rounds`` times (e.g. the training loader).
        current_batch: the training batch on which L_g is measured.
        ratios: R (shape (K,)): ``reference_ratio_weights(stats.norms)`` or, for the paper
            semantics, ``paper_ratio_weights(stats.norms)``.
        generator: the source of the perturbation noise (reproducible runs).
        progress: called as progress(step, L_t, L_g) after every adapter step (0-d device
            tensors: reading them synchronizes, so a progress bar should do it sparingly).

    The model is in eval mode during the teleport (as the public code) and goes back to the
    mode it had. Returns a ``TeleportResult``; the adapter ends disabled and reset.
    """
    config = config or TeleportConfig()
    if iter(data) is data:
        raise ValueError("the teleport data must be re-iterable (a DataLoader or a list), not a one-shot iterator")
    was_training = model.training
    model.eval()
    adapter_ids = {id(p) for p in adapter.adapter_parameters}
    perturb = [(name, p) for name, p in model.named_parameters() if id(p) not in adapter_ids]
    name_of = {id(p): name for name, p in model.named_parameters()}
    shared = [(name_of[id(p)], p) for p in adapter.base_parameters]
    snapshot = adapter.snapshot()
    try:
        contour = loss_contour(model, loss_fn, data)
        if config.semantics == "paper":
            radius, base_seed = paper_radius_and_seed(adapter.base_parameters, config, generator)
        adapter.set_enabled(True)
        optimizer = torch.optim.Adam(adapter.adapter_parameters, lr=config.lr)
        task_terms: list[torch.Tensor] = []
        sharp_terms: list[torch.Tensor] = []
        steps = 0
        for _ in range(config.rounds):
            for batch in data:
                # The perturbations modify parameters in place, so they run before any graph of
                # this step exists (autograd would reject saved tensors that were modified).
                if config.semantics == "paper":
                    seeds = [base_seed + steps * config.num_samples + j for j in range(config.num_samples)]
                    sharp_term = paper_sharpness(
                        model, shared, loss_fn, current_batch, ratios, seeds, radius, config.samples_per_pass
                    )
                else:
                    perturbed = perturbed_losses(
                        model,
                        perturb,
                        loss_fn,
                        current_batch,
                        config.num_samples,
                        config.noise_norm,
                        generator,
                        config.samples_per_pass,
                    )
                    unperturbed = loss_fn(model, current_batch)
                    sharp_term = reference_sharpness(unperturbed, perturbed, ratios.to(unperturbed), config.noise_norm)
                losses = loss_fn(model, batch)
                task_term = (losses - contour.to(losses)).abs().mean()
                objective = config.task_weight * task_term - config.sharpness_weight * sharp_term
                optimizer.zero_grad(set_to_none=True)
                objective.backward(inputs=adapter.adapter_parameters)
                optimizer.step()
                steps += 1
                task_terms.append(task_term.detach())
                sharp_terms.append(sharp_term.detach())
                if progress is not None:
                    progress(steps, task_terms[-1], sharp_terms[-1])
                if config.max_steps is not None and steps >= config.max_steps:
                    break
            if config.max_steps is not None and steps >= config.max_steps:
                break
        deltas = adapter.merge_and_reset()
        adapter.set_enabled(False)
        after = loss_contour(model, loss_fn, data) if config.guard else None
        rolled_back = after is not None and bool(
            (after > contour * (1 + config.guard_tolerance) + 1e-12).any() or not torch.isfinite(after).all()
        )
        if rolled_back:
            adapter.restore(snapshot)
            deltas = [torch.zeros_like(d) for d in deltas]
        # one host transfer for the whole history (nothing synchronizes inside the loop)
        history = torch.stack(task_terms + sharp_terms).tolist() if steps else []
        return TeleportResult(deltas, steps, history[:steps], history[steps:], contour, after, rolled_back)
    except BaseException:
        adapter.set_enabled(False)
        adapter.restore(snapshot)
        raise
    finally:
        model.train(was_training)
