"""COST's teleport: train the LoRA adapter to a loss-equivalent, sharper point, merge, check.

    L*_i   = mean over the teleport data of L_i(θ)                      (before any adapter step)
    L_t    = (1/K) Σ_i |L_i(θ+Δθ; b) - L*_i|                            (teleport batch b)
    L_lora = a L_t - b L_g,   minimized by Adam over the adapter, ``rounds`` passes over the data

with L_g, a and b given by the semantics (``cost_fast.teleport.semantics``: "public" or "paper"). Then
the adapter is merged into the backbone (Δθ) and reset.

After the merge the teleport is judged by ``cost_fast.teleport.verdict.settle``, the one verdict
path of every teleport kind: a non-finite teleport (its adapter steps, L*, ΔW or the merged
weights) is never merged; where the teleport data is evaluated after the merge
(``TeleportConfig(measure_level_set=True)``, the default: one forward pass per teleport batch
without grad, shared with the guard's) its level-set error

    e = max_i |L_i(θ+Δθ) - L*_i| / max(|L*_i|, floor)      (means over the teleport data)

is measured and reported in ``TeleportResult``/``StepInfo``; ``TeleportConfig(level_set_tolerance=
tol)`` makes the teleport loss-preserving (W + t·ΔW, t halved while e > tol, a rollback "left the
level set" if no t qualifies; off by default, so the public code's teleport stays as it is); the
guard (on by default in paper semantics, off in public semantics as in the public code;
``TeleportConfig(guard=...)`` overrides) rolls back a teleport that raised some task's mean loss
by more than ``guard_tolerance``·|L*_i|. A rollback puts the backbone back bit-exactly.

The adapter lives in weight space (``TeleportAdapter``): per adapter step its update ΔW is formed
once, and every forward pass of the step, with grad or without, is a plain forward pass of the
model at W + ΔW (``EffectivePoint``). The model is in eval mode (as in the public code) and every
module goes back to the mode it had.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cost_fast.checks import all_finite
from cost_fast.kernels.tensorwise_noise import triton_noise_runs
from cost_fast.teleport.config import TeleportConfig
from cost_fast.teleport.contour import eval_mode, loss_contour
from cost_fast.teleport.graphs import CaptureRefused, GraphedStep, refusal
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.perturbed import EffectivePoint, LossFn
from cost_fast.teleport.semantics import Semantics, get_semantics
from cost_fast.teleport.verdict import settle


@dataclasses.dataclass
class TeleportResult:
    """What a teleport did. ``deltas`` is Δθ aligned with the adapter's base parameters
    (all zeros after a rollback); ``task_terms``/``sharpness_terms`` are L_t and L_g per step;
    ``contour_before``/``contour_after`` the mean task losses over the teleport data at the start
    and at the point merged (or last tried, after a rollback); ``level_set_error`` the error at
    that point (module docstring); ``fraction`` the share t of the trained ΔW merged;
    ``graph_note`` (``TeleportConfig(cuda_graphs=True)`` only, else None) ``"captured"`` or why
    the adapter steps ran eagerly (``cost_fast.teleport.graphs``);
    ``rollback_reason`` says why it was rolled back ("loss rose", "non-finite", "left the level
    set"), else None."""

    deltas: list[torch.Tensor]
    steps: int
    task_terms: list[float]
    sharpness_terms: list[float]
    contour_before: torch.Tensor
    contour_after: torch.Tensor | None  # None when nothing evaluated the data after the merge
    rollback_reason: str | None
    level_set_error: float | None = None  # None when contour_after is None
    fraction: float = 1.0
    graph_note: str | None = None  # cuda_graphs: "captured", or why the steps ran eagerly

    @property
    def rolled_back(self) -> bool:
        """True when the guard put the backbone back where it was."""
        return self.rollback_reason is not None


def adapter_optimizer(factors: list[torch.Tensor], lr: float, *, capturable: bool = False) -> torch.optim.Adam:
    """Adam over the adapter's factors: torch's fused Adam where the device has it (one kernel
    for all factors, its step counts on the device: no host read), else the multi-tensor one.
    Equal to the per-tensor Adam up to rounding (bit-exact in float64, measured).
    ``capturable``: built for a CUDA graph (``cost_fast.teleport.graphs``)."""
    try:
        return torch.optim.Adam(factors, lr=lr, fused=True, capturable=capturable)
    except RuntimeError:  # torch refuses fused Adam on this device or dtype when it is built
        return torch.optim.Adam(factors, lr=lr, foreach=True, capturable=capturable)


def teleport(
    model: nn.Module,
    adapter: TeleportAdapter,
    loss_fn: LossFn,
    data: Iterable[Any],
    current_batch: Any,
    *,
    ratios: torch.Tensor,
    semantics: str | Semantics,
    config: TeleportConfig,
    lr: float | None = None,
    generator: torch.Generator | None = None,
    reset: bool = True,
    progress: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    sum_over_ranks: Callable[[list[torch.Tensor | None]], None] | None = None,
) -> TeleportResult:
    """One COST teleport of ``model``'s shared backbone (module docstring).

    Args:
        model: the whole multi-task model (``loss_fn(model, batch)`` gives its K losses).
        adapter: the ``TeleportAdapter`` built on the shared backbone; its scale is set from
            the semantics (``lora_alpha / rank``).
        data: the teleport data, iterated 1 + ``config.rounds`` times, +1 to measure the
            level-set error (``config.evaluates_after``), +1 per halving of t.
        current_batch: the training batch on which L_g is measured.
        ratios: R (shape (K,)), ``semantics.ratio_weights(norms)`` (keyword-only: the yardstick
            takes the gradient norms in its place).
        semantics: ``"public"``, ``"paper"`` or a ``Semantics``: L_g, the objective's weights
            and the adapter's alpha.
        config: the ``TeleportConfig``.
        lr: the adapter's learning rate when ``config.lr`` is None.
        generator: the source of the perturbation noise (reproducible runs).
        reset: start from freshly drawn adapter factors (default); False keeps the factors the
            adapter holds (e.g. set by the caller to compare with another implementation).
        progress: called as progress(step, L_t, L_g) after every adapter step (0-d device
            tensors: reading them synchronizes, so a progress bar should do it sparingly).
        sum_over_ranks: called with the adapter's gradients before each adapter step (data
            parallel: their sum over the ranks, ``Ranks.sum_over_ranks``; None with one process).

    Draws, in this order, from ``generator``: the adapter's random factors (``adapter.reset``,
    which uses the adapter's generator: COST gives both the same one; nothing with
    ``reset=False``), then the semantics' noise. Returns a ``TeleportResult``.
    """
    semantics = get_semantics(semantics)
    if not isinstance(config, TeleportConfig):
        raise TypeError(f"config must be a TeleportConfig, got {type(config).__name__}")
    if not isinstance(adapter, TeleportAdapter):
        raise TypeError(f"adapter must be a TeleportAdapter, got {type(adapter).__name__}")
    if not isinstance(ratios, torch.Tensor) or ratios.ndim != 1:
        got = f"shape {tuple(ratios.shape)}" if isinstance(ratios, torch.Tensor) else type(ratios).__name__
        raise ValueError(f"ratios must be the 1-D tensor R of the K ratio weights, got {got}")
    if iter(data) is data:
        raise ValueError("the teleport data must be re-iterable (a DataLoader or a list), not a one-shot iterator")
    adapter_lr = config.lr if config.lr is not None else lr
    if adapter_lr is None:
        raise ValueError("the adapter's learning rate is unknown: set TeleportConfig(lr=...) or pass lr")
    snapshot = adapter.snapshot()
    with eval_mode(model):
        try:
            contour = loss_contour(model, loss_fn, data)  # the identity adapter would change nothing
            adapter.set_alpha(semantics.lora_alpha)
            if reset:
                adapter.reset()
            name_of = {id(p): name for name, p in model.named_parameters()}
            device = adapter.adapted_weights[0].device
            probe = semantics.sharpness_probe(
                model,
                loss_fn,
                current_batch,
                ratios,
                model_parameters=list(model.named_parameters()),
                shared_parameters=[(name_of[id(p)], p) for p in adapter.base_parameters],
                generator=generator,
                samples_per_pass=config.resolved_samples_per_pass(device, parallel=sum_over_ranks is not None),
                num_samples=config.num_samples,
                stack_batches=config.stack_batches,
            )
            weight_names = [name_of[id(w)] for w in adapter.adapted_weights]
            refused = None
            if config.cuda_graphs:
                total = sum(p.numel() for p in model.parameters())
                refused = refusal(
                    semantics,
                    device,
                    current_batch,
                    parallel=sum_over_ranks is not None,
                    triton_noise=triton_noise_runs(device, total),
                )
                if refused is not None:
                    warnings.warn(f"{refused}; the adapter steps run eagerly", CaptureRefused, stacklevel=2)
            graphed = config.cuda_graphs and refused is None
            optimizer = adapter_optimizer(adapter.adapter_parameters, adapter_lr, capturable=graphed)
            task_terms: list[torch.Tensor] = []
            sharp_terms: list[torch.Tensor] = []

            def adapter_step(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                """One adapter step on the teleport batch ``batch``: (L_t, L_g), detached."""
                deltas = adapter.deltas()  # once per step: every forward below is a plain one
                point = EffectivePoint(
                    model,
                    loss_fn,
                    dict(zip(weight_names, [w + d for w, d in zip(adapter.adapted_weights, deltas)])),
                    lambda: adapter.applied(deltas),
                )
                # The probe's no-grad passes write W + ΔW (+ ε) into the weights in place and
                # put them back before any forward pass with grad of this step runs.
                sharp_term, losses = probe(len(task_terms), point, batch)
                task_term = (losses - contour.to(losses)).abs().mean()
                objective = semantics.task_weight * task_term - semantics.sharpness_weight * sharp_term
                optimizer.zero_grad(set_to_none=True)
                objective.backward(inputs=adapter.adapter_parameters)
                if sum_over_ranks is not None:
                    sum_over_ranks([p.grad for p in adapter.adapter_parameters])
                optimizer.step()
                return task_term.detach(), sharp_term.detach()

            run_step: Callable[[Any], tuple[torch.Tensor, ...]] = adapter_step
            if graphed:
                run_step = GraphedStep(
                    adapter_step, device=device, before_capture=lambda: optimizer.zero_grad(set_to_none=True)
                )
            steps = 0
            budget = config.max_steps if config.max_steps is not None else float("inf")
            for _ in range(config.rounds):
                for batch in data:
                    task_term, sharp_term = run_step(batch)
                    steps += 1
                    task_terms.append(task_term)
                    sharp_terms.append(sharp_term)
                    if progress is not None:
                        progress(steps, task_term, sharp_term)
                    if steps >= budget:
                        break
                if steps >= budget:
                    break
            verdict = settle(
                config,
                semantics,
                before=contour,
                move=lambda fraction: adapter.merge(fraction),
                # L*, every step's L_t and L_g, ΔW and the merged weights: one host read
                finite=lambda deltas: all_finite(
                    [contour, *task_terms, *sharp_terms, *deltas, *adapter.adapted_weights]
                ),
                measure=lambda: loss_contour(model, loss_fn, data),
                rollback=lambda: adapter.restore(snapshot),
                shrinkable=True,
            )
            # one host transfer for the whole history (nothing synchronizes inside the loop)
            history = torch.stack(task_terms + sharp_terms).tolist() if steps else []
            return TeleportResult(
                verdict.deltas,
                steps,
                history[:steps],
                history[steps:],
                contour,
                verdict.after,
                verdict.reason,
                verdict.error,
                verdict.fraction,
                getattr(run_step, "note", refused) if config.cuda_graphs else None,  # a GraphedStep's note
            )
        except BaseException:
            adapter.restore(snapshot)
            raise
