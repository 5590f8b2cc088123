"""A low-rank adapter (LoRA, or LoHa) on a shared backbone, attached only while a teleport runs.

The public COST code wraps the model with ``peft.get_peft_model`` at every teleport and
unwraps it with ``merge_and_unload``. Here the peft layers are built once (``peft``'s
``inject_adapter_in_model``, which keeps the backbone's own Parameter objects, so optimizers
and ``TaskGradients`` that hold them stay valid) and then taken out again: between teleports
the backbone holds its original modules, so ``model.state_dict()`` has exactly the keys of the
plain model and a checkpoint loads into it with ``strict=True``. ``attached()`` swaps the
adapter layers in for the duration of a teleport. A teleport starts with ``reset()`` (the
identity, B = 0, with the random factors drawn from the adapter's own generator, never torch's
global one, so the user's random stream is untouched and a resumed run draws the same factors)
and ends with ``merge()``:

    W ← W + ΔW   (per adapted layer, ΔW from peft's ``get_delta_weight``: s·BA for LoRA,
                  s·(B1A1 ⊙ B2A2) for LoHa, with s = alpha / rank).

The scale has one source, the semantics (``Semantics.lora_alpha``): ``teleport()`` sets it with
``set_alpha`` before the adapter is used, and the adapter refuses to run or merge without one.
``snapshot``/``restore`` copy the adapted weights for a bit-exact rollback.

Only layers whose weight requires grad are adapted: a layer the user froze is never changed;
``targets`` narrows the choice further (the public SegNet-MTAN code adapts its shared convs but
not its attention convs). ``adapted_layers`` makes that choice, and raises every error about it,
without importing peft (whose import pulls in transformers: seconds), so that COST can check a
backbone up front and build the adapter only when a teleport first needs it.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cost_fast.checks import check_int, check_positive
from cost_fast.rng import caller_generators_untouched

ADAPTER = "cost_teleport"
ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
METHODS = ("lora", "loha")


def adapted_layers(
    backbone: nn.Module, method: str = "lora", targets: Callable[[str, nn.Module], bool] | None = None
) -> list[str]:
    """The names (relative to ``backbone``) of the layers an adapter of ``method`` would adapt:
    the trainable Linear/Conv layers that ``targets(name, layer)`` chooses (default: all).
    ``ValueError`` naming the problem when there is none, when the backbone is itself one layer
    (peft cannot adapt it in place) or already holds peft layers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (OFT is not supported), got {method!r}")
    if isinstance(backbone, ADAPTED_TYPES):
        raise ValueError(
            "the backbone is itself a single layer, which peft cannot adapt in place: wrap it, e.g. nn.Sequential(layer)"
        )
    if "peft" in sys.modules:  # a backbone can hold peft layers only if peft was imported
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in backbone.modules()):
            raise ValueError("the backbone already holds LoRA/LoHa layers")
    trainable = [
        (name, m) for name, m in backbone.named_modules() if isinstance(m, ADAPTED_TYPES) and m.weight.requires_grad
    ]
    if not trainable:
        frozen = any(isinstance(m, ADAPTED_TYPES) for m in backbone.modules())
        raise ValueError(
            "the backbone has no trainable Linear or Conv layer to adapt"
            + (" (all of them are frozen)" if frozen else "")
        )
    chosen = [name for name, m in trainable if targets is None or targets(name, m)]
    if not chosen:
        raise ValueError("targets chose none of the backbone's trainable Linear/Conv layers")
    return chosen


class TeleportAdapter:
    """A rank-``rank`` adapter on every trainable Linear/Conv layer of ``backbone``.

    Args:
        backbone: the shared module; its parameters keep their identity and ``requires_grad``,
            and its modules are its own again when this constructor returns.
        rank: adapter rank r ≥ 1 (default 5, as COST). Its alpha (scale alpha/r) is set by
            ``set_alpha``: ``teleport()`` takes it from the semantics.
        method: ``"lora"`` (W + s·BA, default) or ``"loha"`` (W + s·(B1A1 ⊙ B2A2), LoHa).
            OFT is not offered: its update is multiplicative (W R) and peft's OFT layers do not
            reproduce the base output exactly at initialization.
        generator: source of the adapter's random factors at every ``reset()`` (default: a
            generator seeded 0 on the backbone's device).
        targets: ``targets(name, layer) -> bool`` chooses among the trainable Linear/Conv layers
            (``name`` relative to the backbone); default: all of them.

    Attributes:
        layers: the peft adapter layers, in module order (attached only inside ``attached()``).
        adapter_parameters: their weights.
        base_parameters: the backbone's trainable parameters (what a teleport may change).
        adapted_weights: the weights of the adapted layers (what a merge writes into).
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
        chosen = adapted_layers(backbone, method, targets)
        from peft import LoHaConfig, LoraConfig, inject_adapter_in_model
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lora.layer import LoraLayer

        self.base_parameters = [p for p in backbone.parameters() if p.requires_grad]
        flags = [(p, p.requires_grad) for p in backbone.parameters()]
        had_config = hasattr(backbone, "peft_config")
        # A regex that matches the full names exactly: a list would match name suffixes too.
        pattern = "^(" + "|".join(re.escape(t) for t in chosen) + ")$"
        # peft needs an alpha to build the layers; the scale in use is set by set_alpha.
        if method == "lora":
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern)
        else:
            config = LoHaConfig(r=rank, alpha=rank, target_modules=pattern)
        with caller_generators_untouched(backbone):
            inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
        if not had_config and hasattr(backbone, "peft_config"):
            del backbone.peft_config  # peft's bookkeeping; the backbone must look untouched
        for p, flag in flags:
            p.requires_grad_(flag)  # peft freezes the base weights; COST trains them between teleports
        self.method = method
        self.rank = rank
        self.alpha: float | None = None
        self.backbone = backbone
        # (parent module, attribute, adapter layer, original layer) for every adapted layer
        self._slots: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        for name, module in list(backbone.named_modules()):
            if isinstance(module, LoraLayer | LoHaLayer):
                parent_name, _, attr = name.rpartition(".")
                parent = backbone.get_submodule(parent_name) if parent_name else backbone
                self._slots.append((parent, attr, module, module.base_layer))
        self.layers = [slot[2] for slot in self._slots]
        self.adapter_parameters = [
            p for layer in self.layers for name, p in layer.named_parameters() if ADAPTER in name.split(".")
        ]
        self.adapted_weights = [slot[3].weight for slot in self._slots]
        device = self.adapted_weights[0].device
        self.generator = generator if generator is not None else torch.Generator(device=device).manual_seed(0)
        self.is_attached = False
        self._put(original=True)

    def set_alpha(self, alpha: float) -> None:
        """Set the scale s = alpha / rank of every adapted layer (``teleport()`` passes the
        semantics' ``lora_alpha``)."""
        alpha = check_positive("alpha", alpha)
        for layer in self.layers:
            layer.scaling[ADAPTER] = alpha / self.rank
            named = layer.lora_alpha if self.method == "lora" else layer.alpha
            named[ADAPTER] = alpha
        self.alpha = alpha

    def _require_alpha(self) -> None:
        if self.alpha is None:
            raise RuntimeError(
                "the adapter's alpha is not set: call set_alpha(semantics.lora_alpha) (teleport() does it)"
            )

    def _put(self, *, original: bool) -> None:
        for parent, attr, layer, base in self._slots:
            setattr(parent, attr, base if original else layer)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Swap the adapter layers into the backbone for the block (a teleport) and the
        original layers back afterwards, also on error."""
        if self.is_attached:
            raise RuntimeError("the teleport adapter is already attached")
        self._require_alpha()
        self._put(original=False)
        self.is_attached = True
        try:
            yield
        finally:
            self._put(original=True)
            self.is_attached = False

    @torch.no_grad()
    def merge(self) -> list[torch.Tensor]:
        """W ← W + ΔW for every adapted layer (one multi-tensor add). Returns Δθ aligned with
        ``base_parameters`` (zeros for parameters the adapter does not touch, e.g. biases and
        norms). The adapter itself is left as it is: the next teleport starts with ``reset()``."""
        self._require_alpha()
        deltas = {id(layer.base_layer.weight): layer.get_delta_weight(ADAPTER) for layer in self.layers}
        out = [deltas[id(p)].to(p.dtype) if id(p) in deltas else torch.zeros_like(p) for p in self.base_parameters]
        torch._foreach_add_(self.adapted_weights, [deltas[id(w)].to(w.dtype) for w in self.adapted_weights])
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity, as peft initializes it (B = 0 for LoRA; the second Hadamard
        factor's B = 0 for LoHa), with every nonzero factor redrawn from ``self.generator``
        as U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming_uniform(a=√5))."""
        with caller_generators_untouched(self.backbone):
            for layer in self.layers:
                if self.method == "lora":
                    layer.reset_lora_parameters(ADAPTER, True)
                else:
                    layer.reset_adapter_parameters(ADAPTER)
        for p in self.adapter_parameters:
            if p.ndim >= 2 and bool(p.any()):
                fan_in = p.shape[1] * math.prod(p.shape[2:])
                bound = 1.0 / math.sqrt(fan_in)
                draw = torch.rand(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                p.copy_(draw.mul_(2 * bound).sub_(bound))

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
