"""Loss-based multi-task weightings, one small class each."""

from __future__ import annotations

import math

import torch
from torch import nn

from cost_fast.checks import check_int, check_nonnegative, check_positive, check_seed
from cost_fast.registry import register
from cost_fast.weighting.base import LossWeighting


@register("si")
class ScaleInvariant(LossWeighting):
    """SI, scale-invariant loss: total = Σ_i log L_i, so w_i = 1/L_i (invariant to each task's
    loss scale)."""

    needs_positive_losses = True

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.log().sum()


@register("gls")
class GLS(LossWeighting):
    """GLS (Chennupati et al., "MultiNet++", CVPR-W 2019), geometric mean of the losses:
    total = (Π_i L_i)^(1/K), so w_i = total / (K L_i)."""

    needs_positive_losses = True

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        return losses.log().mean().exp()


@register("rlw")
class RLW(LossWeighting):
    """RLW (Lin et al., "Reasonable Effectiveness of Random Weighting", TMLR 2022): a fresh
    w = softmax(z), z ~ N(0, I), at every call; total = Σ_i w_i L_i.

    Args:
        num_tasks: K. seed: seed of z (the generator state is in ``state_dict`` as extra state).
    """

    def __init__(self, num_tasks: int, seed: int = 0) -> None:
        super().__init__(num_tasks)
        self._generator = torch.Generator().manual_seed(check_seed("seed", seed))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        z = torch.randn(self.num_tasks, generator=self._generator)
        return (torch.softmax(z, dim=0).to(losses) * losses).sum()

    def get_extra_state(self) -> torch.Tensor:
        return self._generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)


@register("dwa")
class DWA(LossWeighting):
    """DWA (Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019):

        w_k = K softmax_k(r / T),   r_k = L̄_k(e-1) / L̄_k(e-2),   total = Σ_k w_k L_k,

    with L̄(e) the mean loss of epoch e; w = 1 for the first two epochs. Call ``update(losses)``
    every step and ``end_epoch()`` at the end of every epoch.

    Args:
        num_tasks: K. temperature: T > 0 (default 2.0).
    """

    update_arguments = ("losses",)

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        self.temperature = check_positive("temperature", temperature)
        self.register_buffer("epoch_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))  # [e-2, e-1]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        # both branches on the device and one selected there: no read of the epoch counter
        ratio = self.history[1] / self.history[0].clamp_min(1e-30)
        w = torch.where(self.epochs_seen < 2, 1.0, self.num_tasks * torch.softmax(ratio / self.temperature, dim=0))
        return (w.to(losses) * losses).sum()

    def update(self, losses: torch.Tensor) -> None:
        """Add one step's losses to the running epoch mean."""
        self.check_losses(losses)
        self.epoch_sum += losses.detach().to(self.epoch_sum)
        self.epoch_steps += 1

    def end_epoch(self) -> None:
        """Close the epoch: its mean loss becomes L̄(e-1)."""
        if int(self.epoch_steps) == 0:
            raise RuntimeError("DWA.end_epoch() with no update(losses) in this epoch")
        self.history[0] = self.history[1]
        self.history[1] = self.epoch_sum / self.epoch_steps
        self.epochs_seen += 1
        self.epoch_sum.zero_()
        self.epoch_steps.zero_()


@register("uw")
class UW(LossWeighting):
    """UW (Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses", CVPR 2018),
    with learned log-variances s_i = log σ_i² (an ``nn.Parameter``; add ``self.parameters()``
    to the optimizer):

        total = Σ_i ½ (exp(-s_i) L_i + s_i),   w_i = ½ exp(-s_i),   optimal s_i = log L_i.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_vars.to(losses)
        return 0.5 * (torch.exp(-s) * losses + s).sum()


@register("imtl_l")
class IMTLL(LossWeighting):
    """IMTL-L (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), learned scales
    s_i (an ``nn.Parameter``; add ``self.parameters()`` to the optimizer):

        total = Σ_i (exp(s_i) L_i - s_i),   w_i = exp(s_i),   optimal exp(s_i) L_i = 1.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.scales = nn.Parameter(torch.zeros(num_tasks))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.scales.to(losses)
        return (torch.exp(s) * losses - s).sum()


@register("stch")
class STCH(LossWeighting):
    """STCH (Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML 2024) with the warm-up and nadir normalization of its implementation:

        warm-up (first ``warmup_steps`` updates): total = Σ_i log L_i, and the losses are
            averaged into the nadir vector z;
        then: total = K μ log Σ_i exp(log(L_i / z_i) / μ)   (preference 1/K, ideal point 0).

    Call ``update(losses)`` once per step.

    Args:
        num_tasks: K. mu: smoothing μ > 0 (default 1.0). warmup_steps: ≥ 0 (default 0: z = 1).
    """

    update_arguments = ("losses",)

    needs_positive_losses = True

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_steps: int = 0) -> None:
        super().__init__(num_tasks)
        self.mu = check_positive("mu", mu)
        if not math.isfinite(num_tasks * self.mu * math.log(max(num_tasks, 2))):
            raise ValueError(f"mu must keep the total K μ log Σ exp(·/μ) finite, got mu={mu!r} for {num_tasks} tasks")
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nadir_sum", torch.zeros(num_tasks, dtype=torch.float64))

    @property
    def nadir(self) -> torch.Tensor:
        """z: the mean warm-up loss (ones without warm-up)."""
        if self.warmup_steps == 0:
            return torch.ones_like(self.nadir_sum)
        return self.nadir_sum / float(self.warmup_steps)

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        # both branches on the device and one selected there: no read of the step counter (a
        # zero nadir during the warm-up counts as 1 in the branch not taken, which stays finite)
        nadir = self.nadir.to(losses)
        y = (losses / torch.where(nadir > 0, nadir, torch.ones_like(nadir))).log()
        after = self.num_tasks * self.mu * torch.logsumexp(y / self.mu, dim=0)
        warming = self.steps < min(self.warmup_steps, 2**62)  # the counter is int64; it never gets there
        return torch.where(warming, losses.log().sum(), after)

    def update(self, losses: torch.Tensor) -> None:
        """Count the step; during warm-up, add the losses to the nadir average."""
        self.check_losses(losses)
        if int(self.steps) < self.warmup_steps:
            self.nadir_sum += losses.detach().to(self.nadir_sum)
        self.steps += 1


@register("famo")
class FAMO(LossWeighting):
    """FAMO (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023).

    With z = softmax(ξ), D_i = L_i - m_i + ε (m: lower bounds of the losses, default 0):

        total = Σ_i z_i log D_i / c,   c = Σ_i z_i / D_i (held constant),   w_i = z_i / (c D_i).

    After the optimizer step, ``update(new_losses)`` (the same batch's losses at the new
    parameters) moves ξ by Adam (lr, weight decay) along -Jᵀδ, J = ∂z/∂ξ, where
    δ_i = log D_i(before) - log D_i(after) is each task's log-improvement: tasks that
    improved less gain weight.

    Args:
        num_tasks: K. lr: Adam step on ξ (default 0.025). weight_decay: (default 1e-3).
        min_losses: m (default 0; finite). eps: ε in (0, 1] (default 1e-8).
    """

    update_arguments = ("losses_after",)

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: torch.Tensor | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(num_tasks)
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        self.eps = check_positive("eps", eps)
        if self.eps > 1:  # a small number added to the losses before their logarithm
            raise ValueError(f"eps must be in (0, 1], got {eps!r}")
        m = torch.zeros(num_tasks) if min_losses is None else torch.as_tensor(min_losses, dtype=torch.float32)
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"min_losses must be finite numbers, got {m.tolist()!r}")
        if m.shape != (num_tasks,):
            raise ValueError(f"min_losses must have shape ({num_tasks},), got {tuple(m.shape)}")
        self.register_buffer("min_losses", m.clone())
        self._host_min_losses = m.double()
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("last_losses", torch.full((num_tasks,), float("nan")))
        self.register_buffer("adam_m", torch.zeros(num_tasks))
        self.register_buffer("adam_v", torch.zeros(num_tasks))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.int64))

    def check_values(self, values: torch.Tensor) -> None:
        super().check_values(values)
        # the bounds as the values' device holds them: a host copy for host values, kept in step
        # with the buffer (set at construction and by load_state_dict)
        bounds = self._host_min_losses if values.device.type == "cpu" else self.min_losses
        if not bool((values - bounds.to(values) + self.eps > 0).all()):
            raise ValueError("FAMO needs every loss above its lower bound min_losses")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_min_losses = self.min_losses.detach().to("cpu", torch.float64)

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        self.last_losses.copy_(losses.detach().to(self.last_losses))
        z = torch.softmax(self.logits, dim=0).to(losses)
        D = losses - self.min_losses.to(losses) + self.eps
        c = (z / D).sum().detach()
        return (z * D.log()).sum() / c

    def update(self, new_losses: torch.Tensor) -> None:
        """One Adam step on ξ from the losses before (the last ``forward``) and after the step."""
        self.check_losses(new_losses)
        if torch.isnan(self.last_losses).any():
            raise RuntimeError("FAMO.update() before any forward(losses)")
        m = self.min_losses
        delta = (self.last_losses - m + self.eps).log() - (new_losses.detach().float() - m + self.eps).log()
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # Jᵀδ for the softmax Jacobian J
        grad = grad + self.weight_decay * self.logits
        self.adam_steps += 1
        b1, b2, t = 0.9, 0.999, int(self.adam_steps)
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.adam_m / (1 - b1**t)
        v_hat = self.adam_v / (1 - b2**t)
        self.logits -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)


@register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing",
    ICML 2018). total = Σ_i w_i L_i with learned weights w (Σ w = K), updated by
    ``update(losses, grad_norms)`` where grad_norms_i = ‖∇_W L_i‖ on the shared weights W
    (e.g. ``gram_stats(...).norms`` of the engine, i.e. all shared parameters rather than the
    paper's last shared layer):

        G_i = w_i n_i,  r_i = (L_i/L_i(0)) / mean_j(L_j/L_j(0)),  L_grad = Σ_i |G_i - mean(G) r_i^α|,
        w ← w - lr ∂L_grad/∂w  (targets held constant),  then w ← K w / Σ w  (w ≥ 1e-6).

    Args:
        num_tasks: K. alpha: restoring strength α ≥ 0 (default 1.5). lr: step on w (default 0.025).
    """

    update_arguments = ("losses", "grad_norms")

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(num_tasks)
        self.alpha = check_nonnegative("alpha", alpha)
        self.lr = check_positive("lr", lr)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.task_weights.to(losses) * losses).sum()

    def update(self, losses: torch.Tensor, grad_norms: torch.Tensor) -> None:
        """One GradNorm step on the weights (the first call also records L(0))."""
        self.check_losses(losses)
        if not isinstance(grad_norms, torch.Tensor) or grad_norms.shape != (self.num_tasks,):
            raise ValueError(f"grad_norms must be a tensor of shape ({self.num_tasks},)")
        L = losses.detach().float().to(self.task_weights.device)
        n = grad_norms.detach().float().to(self.task_weights.device)
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(L.clamp_min(1e-30))
        ratio = L / self.initial_losses
        r = ratio / ratio.mean()
        G = self.task_weights * n
        target = G.mean() * r**self.alpha
        grad = torch.sign(G - target) * n
        w = (self.task_weights - self.lr * grad).clamp_min(1e-6)
        self.task_weights.copy_(self.num_tasks * w / w.sum())
