"""The teleport's low-rank adapter (LoRA, or LoHa), in weight space: its factors live outside the
model, and a forward pass with the adapter in effect is a plain forward pass of the model at the
effective weights W + ΔW.

Per adapted layer (weight W of shape (out, ...), fan = W[0].numel()), with scale s = alpha / r:

    LoRA   ΔW = s · (B A).view(W.shape),                      A: (r, fan),  B: (out, r)
    LoHa   ΔW = s · ((W1a W1b) ⊙ (W2a W2b)).view(W.shape),    W1a, W2a: (out, r),  W1b, W2b: (r, fan)

the updates of peft's LoRA and (non-effective-conv) LoHa layers, which the public code attaches
with ``get_peft_model`` and merges with ``merge_and_unload`` (the yardstick does the same, and the
tests hold the two to each other). Where peft runs every adapted layer as its base op plus the
adapter's two ops, a scale and an add at full activation size, here ΔW is formed once per adapter
step (a few (out x r)(r x fan) products: nothing next to a forward pass) and every forward is the
layer's own op at W + ΔW, with autograd reaching the factors through ΔW:

- ``deltas()``: the ΔW of every adapted layer, differentiable in the factors;
- W + ΔW evaluated by ``torch.func.functional_call`` (``cost_fast.teleport.perturbed.EffectivePoint``),
  the model untouched;
- ``applied(deltas)``: W ← W + ΔW in place for a block of no-grad passes, then W put back
  bit-exactly (also on error);
- ``merge(fraction=1)``: W ← W + t·ΔW for good, returning Δθ.

The model is never modified otherwise: no module is swapped or wrapped, so ``model.state_dict()``
keeps the plain model's keys, optimizers and ``TaskGradients`` that hold the backbone's Parameter
objects stay valid, and peft is not imported. A teleport starts with ``reset()`` (the identity:
B = 0 for LoRA, W2b = 0 for LoHa, the other factors drawn as U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
peft's kaiming_uniform(a=√5), from the adapter's own generator, never torch's global one, so the
user's random stream is untouched and a resumed run draws the same factors).

The scale has one source, the semantics (``Semantics.lora_alpha``): ``teleport()`` sets it with
``set_alpha`` before the adapter is used, and the adapter refuses to form ΔW without one.
``snapshot``/``restore`` copy the adapted weights for a bit-exact rollback.

Only layers whose weight requires grad are adapted: a layer the user froze is never changed;
``targets`` narrows the choice further (the public SegNet-MTAN code adapts its shared convs but
not its attention convs). ``adapted_layers`` makes that choice and raises every error about it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cost_fast.checks import check_int, check_positive
from cost_fast.teleport.perturbed import flat_copy, unflatten

ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
METHODS = ("lora", "loha")


def adapted_layers(
    backbone: nn.Module, method: str = "lora", targets: Callable[[str, nn.Module], bool] | None = None
) -> list[str]:
    """The names (relative to ``backbone``) of the layers an adapter of ``method`` adapts: the
    trainable Linear/Conv layers that ``targets(name, layer)`` chooses (default: all), each once
    (a layer registered twice is refused: its update would be applied twice). ``ValueError``
    naming the problem when there is none."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (OFT is not supported), got {method!r}")
    trainable = [
        (name, m)
        for name, m in backbone.named_modules(remove_duplicate=False)
        if isinstance(m, ADAPTED_TYPES) and m.weight.requires_grad
    ]
    if not trainable:
        frozen = any(isinstance(m, ADAPTED_TYPES) for m in backbone.modules())
        raise ValueError(
            "the backbone has no trainable Linear or Conv layer to adapt"
            + (" (all of them are frozen)" if frozen else "")
        )
    chosen = [(name, m) for name, m in trainable if targets is None or targets(name, m)]
    if not chosen:
        raise ValueError("targets chose none of the backbone's trainable Linear/Conv layers")
    seen: dict[int, str] = {}  # module and weight ids: a layer registered twice, or tied weights
    for name, m in chosen:
        first = seen.get(id(m), seen.get(id(m.weight)))
        if first is not None:
            raise ValueError(
                f"the layer {name!r} is registered twice in the backbone (or shares its weight with {first!r}): "
                "its update would be applied twice"
            )
        seen[id(m)] = seen[id(m.weight)] = name
    return [name for name, _ in chosen]


class TeleportAdapter:
    """A rank-``rank`` adapter on every trainable Linear/Conv layer of ``backbone``, in weight
    space (module docstring).

    Args:
        backbone: the shared module (never modified but by ``applied``, ``merge`` and ``restore``).
        rank: adapter rank r ≥ 1 (default 5, as COST). Its alpha (scale alpha/r) is set by
            ``set_alpha``: ``teleport()`` takes it from the semantics.
        method: ``"lora"`` (W + s·BA, default) or ``"loha"`` (W + s·(W1a W1b ⊙ W2a W2b)).
            OFT is not offered: its update is multiplicative (W R).
        generator: source of the adapter's random factors at every ``reset()`` (default: a
            generator seeded 0 on the backbone's device).
        targets: ``targets(name, layer) -> bool`` chooses among the trainable Linear/Conv layers
            (``name`` relative to the backbone); default: all of them.

    Attributes:
        names: the adapted layers' names, relative to the backbone.
        adapted_weights: their weights W (the backbone's own Parameters).
        adapter_parameters: the factors (leaf tensors that require grad), layer by layer.
        base_parameters: the backbone's trainable parameters (what a teleport may change).
        alpha: the alpha of the scale alpha/r, None until ``set_alpha``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rank: int = 5,
        method: str = "lora",
        generator: torch.Generator | None = None,
        targets: Callable[[str, nn.Module], bool] | None = None,
    ) -> None:
        check_int("rank", rank, 1)
        self.names = adapted_layers(backbone, method, targets)
        self.backbone, self.method, self.rank = backbone, method, rank
        self.alpha: float | None = None
        self.base_parameters = [p for p in backbone.parameters() if p.requires_grad]
        self.adapted_weights = [backbone.get_submodule(name).weight for name in self.names]
        self._factors: list[list[torch.Tensor]] = []  # per layer: [A, B] or [W1a, W1b, W2a, W2b]
        for w in self.adapted_weights:
            out, fan = w.shape[0], w[0].numel()
            shapes = [(rank, fan), (out, rank)] if method == "lora" else [(out, rank), (rank, fan)] * 2
            self._factors.append(
                [torch.zeros(shape, dtype=w.dtype, device=w.device, requires_grad=True) for shape in shapes]
            )
        self.adapter_parameters = [f for layer in self._factors for f in layer]
        device = self.adapted_weights[0].device
        self.generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)

    def set_alpha(self, alpha: float) -> None:
        """Set the scale s = alpha / rank (``teleport()`` passes the semantics' ``lora_alpha``)."""
        self.alpha = check_positive("alpha", alpha)

    @property
    def scale(self) -> float:
        """s = alpha / rank."""
        if self.alpha is None:
            raise RuntimeError(
                "the adapter's alpha is not set: call set_alpha(semantics.lora_alpha) (teleport() does it)"
            )
        return self.alpha / self.rank

    def deltas(self) -> list[torch.Tensor]:
        """ΔW of every adapted layer (shape of its weight), differentiable in the factors."""
        s = self.scale
        products = []
        for factors in self._factors:
            if self.method == "lora":
                a, b = factors
                products.append(b @ a)
            else:
                w1a, w1b, w2a, w2b = factors
                products.append((w1a @ w1b) * (w2a @ w2b))
        return [d.view(w.shape) for d, w in zip(torch._foreach_mul(products, s), self.adapted_weights)]

    @contextlib.contextmanager
    def applied(self, deltas: list[torch.Tensor]) -> Iterator[None]:
        """W ← W + ΔW (detached) in place for the block, for passes without grad; W is put back
        bit-exactly afterwards, also on error (from one flat copy: a single op)."""
        weights = self.adapted_weights
        saved = flat_copy(weights)
        with torch.no_grad():
            torch._foreach_add_(weights, [d.detach() for d in deltas])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, unflatten(saved, weights))

    @torch.no_grad()
    def merge(self, fraction: float = 1.0) -> list[torch.Tensor]:
        """W ← W + t·ΔW for every adapted layer (one multi-tensor add), t = ``fraction`` (default
        1: the whole update; the teleport's ``level_set_tolerance`` merges less). Returns Δθ = t·ΔW
        aligned with ``base_parameters`` (zeros for parameters the adapter does not touch, e.g.
        biases and norms). The factors are left as they are: the next teleport starts with
        ``reset()``."""
        if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        deltas = [d.detach() for d in self.deltas()]
        if fraction != 1:
            torch._foreach_mul_(deltas, fraction)
        torch._foreach_add_(self.adapted_weights, deltas)
        delta_of = {id(w): d for w, d in zip(self.adapted_weights, deltas)}
        return [delta_of[id(p)] if id(p) in delta_of else torch.zeros_like(p) for p in self.base_parameters]

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity, as peft initializes it: B = 0 for LoRA (A drawn), W2b = 0 for
        LoHa (W1a, W1b, W2a drawn), each drawn factor U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        fan_in its second dimension, from ``self.generator``, layer by layer in factor order."""
        zero = 1 if self.method == "lora" else 3  # the factor that starts at zero
        for factors in self._factors:
            for k, p in enumerate(factors):
                p.grad = None
                if k == zero:
                    p.zero_()
                    continue
                bound = 1.0 / math.sqrt(p.shape[1])
                draw = torch.rand(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                p.copy_(draw.mul_(2 * bound).sub_(bound))

    def set_factors(self, factors: list[torch.Tensor]) -> None:
        """Give the factors (aligned with ``adapter_parameters``), e.g. to compare with another
        implementation (then ``teleport(..., reset=False)``)."""
        if len(factors) != len(self.adapter_parameters):
            raise ValueError(f"got {len(factors)} factors, the adapter has {len(self.adapter_parameters)}")
        with torch.no_grad():
            for p, f in zip(self.adapter_parameters, factors):
                if tuple(f.shape) != tuple(p.shape):
                    raise ValueError(f"a factor of shape {tuple(f.shape)} where {tuple(p.shape)} is expected")
                p.copy_(f)

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the adapted weights (for ``restore``)."""
        return [w.detach().clone() for w in self.adapted_weights]

    @torch.no_grad()
    def restore(self, snapshot: list[torch.Tensor]) -> None:
        """Put the adapted weights back bit-exactly."""
        if len(snapshot) != len(self.adapted_weights):
            raise ValueError(f"snapshot has {len(snapshot)} tensors, the adapter {len(self.adapted_weights)}")
        torch._foreach_copy_(self.adapted_weights, snapshot)
