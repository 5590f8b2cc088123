"""COST's two semantics, each one small frozen object: its trigger, its R weights, its sharpness
term L_g, the g' of its HTR and its default settings.

``"public"`` (the public COST code, zzpustc/COST; the default):

    trigger  min_i cos(g_i, g0) ≤ 0 (and M finite)
    R_i      K (1 - ‖g_i‖ / Σ_j ‖g_j‖)                              (smaller gradients weigh more)
    L_g      (1/K) Σ_i max_j R_i |L_i(θ+Δθ+ε_j; x) - L_i(θ+Δθ; x)| / ν,
             ε_j Gaussian per parameter tensor of the model, each scaled to norm ν = 1e-4;
             the perturbed losses are constants (the public code evaluates them on deep copies).
             ``noise="flat"`` (default): the n samples of a step drawn together
             (``cost_fast.kernels.tensorwise_noise``: one draw on CPU, a Philox Triton kernel
             on CUDA), the same distribution; ``noise="per_tensor"``: one ``torch.randn`` per
             tensor and sample, the public code's own stream
    L_lora   10 L_t - 0.5 L_g
    g'       the last combined update (the step before the teleport)
    LoRA     scale alpha/r = 8/5 (peft's default lora_alpha = 8 with the public code's r = 5)
    guard    off (the public code has none)

``"paper"`` (Eqs. 4 and 7-12 of the paper):

    trigger  #{i : cos(g_i, g0) < 0} ≥ ⌈K/2⌉ (Eq. 4)
    R        K softmax([Σ_j ‖g_j‖ / ‖g_i‖]_i)                         (Eq. 10)
    L_g      max_j | (1/K) Σ_i R_i [L_i(θ+Δθ+ε_j; x) - L_i(θ+Δθ; x)] |  (Eq. 9), both terms
             differentiable, ε_j Gaussian over the shared parameters on the sphere of radius
             δ = relative_radius·‖θ_shared‖ (the paper gives no δ; 0.1 by default, see below)
    L_lora   L_t - 0.1 L_g                                           (Eq. 11)
    g'       the combined gradient at the pre-teleport point           (Eq. 12)
    LoRA     scale alpha/r = 8/5, as the public code (the paper gives none)
    guard    on (ours: the paper has none; it rolls back a teleport that raised a loss)

In both, L_t = (1/K) Σ_i |L_i(θ+Δθ; b) - L*_i| over the teleport batches b, with L*_i the mean
loss over the teleport data before the teleport (``cost_fast.teleport.contour``).

Either semantics takes another trigger by name (``PublicSemantics(trigger="dominated")``), for
the paper's Table 7 ablation; every trigger also requires M finite (``TRIGGERS``):

    "weak"       min_i cos(g_i, g0) ≤ 0, some task conflicts with the mean (the public code's)
    "dominated"  cos(g_s, g0) < 0 for the task s of the smallest gradient norm (Eq. 3)
    "majority"   #{i : cos(g_i, g0) < 0} ≥ ⌈K/2⌉ (Eq. 4, the paper's)
    "always"     every step the schedule allows (smoke runs and benchmarks: a known number of
                 teleports, whatever the data)

How δ is chosen: with random directions, L_g is a first-order quantity, (1/K) Σ R_i ∇L_i·ε, so it
grows linearly with δ (measured on the digits model from δ = 1e-3·‖θ‖ to 0.3·‖θ‖: 3e-5 to 8e-3,
against L_t ≈ 0.04). The default takes the largest radius that still probes the neighbourhood of
θ (10% of its norm), which gives L_g the most weight the paper's objective allows. Even there,
0.1·L_g is under 1% of L_t, and L_g rises during a teleport by the same amount with the term
switched off: at Eq. 11's weight the sharpness term does not steer the teleport on these
problems (``cost-fast reproduce`` measures this with ``sharpness_control``; at 100 times the
weight it does).

Speed (same result): the perturbed losses run without autograd and without model copies
(``cost_fast.teleport.perturbed``); in paper semantics only the arg-max sample is evaluated again with
autograd (the gradient of a max flows through its arg-max alone), and ε_j is regenerated from its
own seed by a Philox Triton kernel on CUDA rather than stored. In public semantics the default
``noise="flat"`` draws a step's n samples at once (a handful of ops where the per-tensor stream
takes one draw and scaling per tensor and sample: 107 tensors and 5 samples on the CelebA CNN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from cost_fast.kernels import GramStats
from cost_fast.kernels.perturb import sphere_noise, sphere_perturb_
from cost_fast.kernels.tensorwise_noise import TensorwiseNoise
from cost_fast.teleport.perturbed import (
    EffectivePoint,
    LossFn,
    PairedLosses,
    flat_sample_losses,
    in_place_losses,
    sample_losses,
)

# The triggers by name (module docstring): a bool device tensor from the statistics, no host read.
TRIGGERS: dict[str, Callable[[GramStats], torch.Tensor]] = {
    "weak": lambda stats: (stats.cos_mean.min() <= 0) & ~stats.nonfinite,
    "dominated": lambda stats: (stats.cos_mean[stats.norms.argmin()] < 0) & ~stats.nonfinite,
    "majority": lambda stats: stats.trigger,  # GramStats.trigger: Eq. 4 and M finite
    "always": lambda stats: ~stats.nonfinite,
}

# (L_g, the losses on the teleport batch) from the adapter step t, its effective point and the
# teleport batch, both differentiable w.r.t. the adapter (a probe may share their forward pass).
SharpnessProbe = Callable[[int, EffectivePoint, Any], tuple[torch.Tensor, torch.Tensor]]
NOISES = ("flat", "per_tensor")
Named = list[tuple[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Semantics:
    """Base of a COST semantics (see the module docstring); subclasses are frozen dataclasses.

    Attributes:
        task_weight, sharpness_weight: a and b of L_lora = a L_t - b L_g.
        lora_alpha: the adapter's alpha (its update is (alpha / rank)·BA); default 8, peft's
            default and so the public code's.
        trigger: a name in ``TRIGGERS``, or None (default): the semantics' own
            (``default_trigger``).
    """

    name: ClassVar[str] = ""
    # g' of HTR: "last_update" (the step before) or "pre_teleport_gradient" (Eq. 12)
    htr_direction: ClassVar[Literal["last_update", "pre_teleport_gradient"]] = "last_update"
    # whether a teleport is checked (and rolled back on a rise) unless TeleportConfig says
    default_guard: ClassVar[bool] = True
    default_trigger: ClassVar[str] = "majority"

    task_weight: float = 1.0
    sharpness_weight: float = 0.1
    lora_alpha: float = 8.0
    trigger: str | None = None

    def __post_init__(self) -> None:
        if self.trigger is not None and self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {sorted(TRIGGERS)} or None, got {self.trigger!r}")
        for field in dataclasses.fields(self):
            if field.name in ("trigger", "noise"):
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ValueError(f"{type(self).__name__}.{field.name} must be a finite number ≥ 0, got {value!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")

    @property
    def trigger_name(self) -> str:
        """The trigger in use: ``trigger``, else the semantics' ``default_trigger``."""
        return self.trigger or self.default_trigger

    def fires(self, stats: GramStats) -> torch.Tensor:
        """The trigger (``trigger_name``), a bool device tensor (no host read)."""
        return TRIGGERS[self.trigger_name](stats)

    def check_model(self, model: nn.Module) -> None:
        """``ValueError`` where this semantics cannot perturb ``model`` (none by default)."""

    def ratio_weights(self, norms: torch.Tensor) -> torch.Tensor:
        """R (shape (K,)) from the task gradient norms."""
        raise NotImplementedError

    def sharpness_probe(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        ratios: torch.Tensor,
        *,
        model_parameters: Named,
        shared_parameters: Named,
        generator: torch.Generator | None,
        samples_per_pass: int,
        num_samples: int,
        stack_batches: bool = False,
    ) -> SharpnessProbe:
        """L_g on ``batch`` and the task losses on a teleport batch as a function of the adapter
        step t, its ``EffectivePoint`` (the weights W + ΔW of that step) and the teleport batch.
        ``model_parameters``: every parameter of the model; ``shared_parameters``: the
        backbone's trainable ones; ``num_samples``: n perturbations per step,
        ``samples_per_pass`` of them per forward; ``stack_batches``: the unperturbed losses on
        ``batch`` and those on the teleport batch as one stacked forward (``PairedLosses``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class PublicSemantics(Semantics):
    """The public COST code's semantics (module docstring). ``noise_norm``: ν; ``noise``: how ε
    is drawn, ``"flat"`` (default) or ``"per_tensor"`` (the public code's stream, bit-exact)."""

    name: ClassVar[str] = "public"
    htr_direction: ClassVar[Literal["last_update", "pre_teleport_gradient"]] = "last_update"
    default_guard: ClassVar[bool] = False
    default_trigger: ClassVar[str] = "weak"

    task_weight: float = 10.0
    sharpness_weight: float = 0.5
    noise_norm: float = 1e-4
    noise: Literal["flat", "per_tensor"] = "flat"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.noise_norm > 0:
            raise ValueError(f"noise_norm must be > 0, got {self.noise_norm!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")

    def check_model(self, model: nn.Module) -> None:
        """``noise="flat"`` draws one (n, P) tensor for all parameters: ``ValueError`` for a
        model whose parameters have several dtypes or devices."""
        if self.noise == "flat" and len({(p.dtype, p.device) for p in model.parameters()}) > 1:
            raise ValueError(
                "noise='flat' needs the model's parameters in one dtype and on one device: "
                "use PublicSemantics(noise='per_tensor')"
            )

    def ratio_weights(self, norms: torch.Tensor) -> torch.Tensor:
        """R_i = K (1 - ‖g_i‖ / Σ_j ‖g_j‖)."""
        K = norms.shape[0]
        total = norms.sum()
        return K * (1 - norms / torch.where(total > 0, total, torch.ones_like(total)))

    def per_tensor_noise(self, params: list[torch.Tensor], generator: torch.Generator | None) -> list[torch.Tensor]:
        """ε = [ν z_k / ‖z_k‖]_k with z_k ~ N(0, I) of each tensor's shape, drawn in parameter
        order from ``generator`` (the public code's order); norms and scaling are multi-tensor ops."""
        noise = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p in params]
        if not noise:
            return noise
        scales = torch._foreach_reciprocal(torch._foreach_norm(noise))
        torch._foreach_mul_(scales, self.noise_norm)
        torch._foreach_mul_(noise, scales)
        return noise

    def sharpness(self, unperturbed: torch.Tensor, perturbed: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """L_g = mean_i max_j R_i |L_i(θ+Δθ+ε_j) - L_i(θ+Δθ)| / ν from the (K,) unperturbed losses
        (differentiable) and the (n, K) perturbed ones (constants)."""
        return (ratios * (perturbed - unperturbed).abs()).max(dim=0).values.mean() / self.noise_norm

    def sharpness_probe(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        ratios: torch.Tensor,
        *,
        model_parameters: Named,
        shared_parameters: Named,
        generator: torch.Generator | None,
        samples_per_pass: int,
        num_samples: int,
        stack_batches: bool = False,
    ) -> SharpnessProbe:
        """ε from ``noise`` (class docstring): ``"flat"`` draws the step's n samples as one
        (n, P) tensor; ``"per_tensor"`` one tensor per parameter and sample, in the public
        code's order."""
        params = [p for _, p in model_parameters]
        pair = PairedLosses(stack_batches)
        self.check_model(model)
        if self.noise == "flat":
            noise = TensorwiseNoise(
                tuple(p.numel() for p in params),
                num_samples,
                self.noise_norm,
                generator=generator,
                dtype=params[0].dtype,
                device=params[0].device,
            )

        def probe(step: int, point: EffectivePoint, teleport_batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            with point.applied():  # the merged weights W + ΔW, perturbed as the public code does
                if self.noise == "flat":
                    perturbed = flat_sample_losses(
                        model, loss_fn, batch, model_parameters, noise.draw(), samples_per_pass
                    )
                else:
                    draws = [lambda: self.per_tensor_noise(params, generator)] * num_samples
                    perturbed = sample_losses(model, loss_fn, batch, model_parameters, draws, samples_per_pass)
            unperturbed, teleport_losses = pair(point, batch, teleport_batch)
            return self.sharpness(unperturbed, perturbed, ratios.to(unperturbed)), teleport_losses

        return probe


@dataclasses.dataclass(frozen=True)
class PaperSemantics(Semantics):
    """The paper's semantics (module docstring). ``relative_radius``: δ / ‖θ_shared‖."""

    name: ClassVar[str] = "paper"
    htr_direction: ClassVar[Literal["last_update", "pre_teleport_gradient"]] = "pre_teleport_gradient"
    default_guard: ClassVar[bool] = True

    task_weight: float = 1.0
    sharpness_weight: float = 0.1
    relative_radius: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.relative_radius > 0:
            raise ValueError(f"relative_radius must be > 0, got {self.relative_radius!r}")

    def ratio_weights(self, norms: torch.Tensor) -> torch.Tensor:
        """R = K softmax([Σ_j ‖g_j‖ / ‖g_i‖]_i) (a zero norm counts as 1e-30)."""
        K = norms.shape[0]
        return K * torch.softmax(norms.sum() / norms.clamp_min(1e-30), dim=0)

    @staticmethod
    def sharpness_term(unperturbed: torch.Tensor, perturbed: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """|(1/K) Σ_i R_i [L_i(θ+Δθ+ε) - L_i(θ+Δθ)]| for (…, K) perturbed losses (the term Eq. 9
        maximizes over j)."""
        return (ratios * (perturbed - unperturbed)).mean(dim=-1).abs()

    def radius(self, shared: list[torch.Tensor]) -> float:
        """δ = relative_radius·‖θ_shared‖."""
        norm = torch.stack(torch._foreach_norm([p.detach() for p in shared])).square().sum().sqrt()
        return self.relative_radius * float(norm)

    def sharpness_probe(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        ratios: torch.Tensor,
        *,
        model_parameters: Named,
        shared_parameters: Named,
        generator: torch.Generator | None,
        samples_per_pass: int,
        num_samples: int,
        stack_batches: bool = False,
    ) -> SharpnessProbe:
        """δ is fixed at the start of the teleport, and so is a base seed (one draw from
        ``generator``): sample j of step t uses seed base + t·n + j."""
        params = [p for _, p in shared_parameters]
        radius = self.radius(params)
        device = generator.device if generator is not None else "cpu"
        base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))

        pair = PairedLosses(stack_batches)

        def probe(step: int, point: EffectivePoint, teleport_batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            seeds = [base_seed + step * num_samples + j for j in range(num_samples)]
            with torch.no_grad(), point.applied():
                base = loss_fn(model, batch)
                if samples_per_pass > 1:
                    draws = [lambda seed=seed: sphere_noise(params, seed, radius) for seed in seeds]
                    perturbed = sample_losses(model, loss_fn, batch, shared_parameters, draws, samples_per_pass)
                else:  # in place, by the Philox kernel: no noise tensor is ever materialized
                    perturbs = [lambda seed=seed: sphere_perturb_(params, seed, radius) for seed in seeds]
                    perturbed = in_place_losses(model, loss_fn, batch, params, perturbs)
                best = int(self.sharpness_term(base, perturbed, ratios).argmax())
            unperturbed, teleport_losses = pair(point, batch, teleport_batch)
            noise = sphere_noise(params, seeds[best], radius)
            moved = {name: point.value(name, p) + e for (name, p), e in zip(shared_parameters, noise)}
            return self.sharpness_term(unperturbed, point.losses(batch, moved), ratios), teleport_losses

        return probe


SEMANTICS: dict[str, type[Semantics]] = {"public": PublicSemantics, "paper": PaperSemantics}


def get_semantics(semantics: str | Semantics) -> Semantics:
    """A ``Semantics`` from its name (``"public"`` or ``"paper"``, default settings) or as given:
    the one resolver for every function that takes a semantics."""
    if isinstance(semantics, Semantics):
        return semantics
    if not isinstance(semantics, str):
        raise TypeError(
            f"semantics must be a name ({', '.join(map(repr, sorted(SEMANTICS)))}) or a Semantics, "
            f"got {type(semantics).__name__}"
        )
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {sorted(SEMANTICS)} or a Semantics object, got {semantics!r}")
    return SEMANTICS[semantics]()
