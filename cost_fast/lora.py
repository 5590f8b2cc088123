"""A low-rank adapter (LoRA, or LoHa) injected once into a shared backbone and kept for every teleport.

The public COST code wraps the model with ``peft.get_peft_model`` at every teleport and
unwraps it with ``merge_and_unload``. Here the adapter is injected once (``peft``'s
``inject_adapter_in_model``, which keeps the backbone's own Parameter objects, so optimizers
and ``TaskGradients`` that hold them stay valid), disabled between teleports (the forward pass
skips it and its parameters need no grad), and after a teleport merged in place and reset:

    W ← W + ΔW   (per adapted layer, ΔW from peft's ``get_delta_weight``: s·BA for LoRA),

then reset to the identity (B = 0) as peft initializes it. ``snapshot``/``restore`` copy the
base weights for a bit-exact rollback.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ADAPTER = "cost_teleport"
ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
METHODS = ("lora", "loha")


class TeleportAdapter:
    """A rank-``rank`` adapter on every Linear/Conv layer of ``backbone`` (modified in place).

    Args:
        backbone: the shared module; its parameters keep their identity and ``requires_grad``.
        rank: adapter rank r ≥ 1 (default 5, as COST). alpha: its alpha (default r, scale 1).
        method: ``"lora"`` (W + s·BA, default) or ``"loha"`` (W + s·(B1A1 ⊙ B2A2), LoHa).
            OFT is not offered: its update is multiplicative (W R) and peft's OFT layers do not
            reproduce the base output exactly at initialization.

    Attributes:
        layers: the peft adapter layers, in module order.
        adapter_parameters: their weights (trainable only while enabled).
        base_parameters: the backbone's own parameters (what a teleport changes).
    """

    def __init__(self, backbone: nn.Module, rank: int = 5, alpha: float | None = None, method: str = "lora") -> None:
        from peft import LoHaConfig, LoraConfig, inject_adapter_in_model
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lora.layer import LoraLayer

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int ≥ 1, got {rank!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (OFT is not supported), got {method!r}")
        if isinstance(backbone, ADAPTED_TYPES):
            raise ValueError(
                "the backbone is itself a single layer, which peft cannot adapt in place: "
                "wrap it, e.g. nn.Sequential(layer)"
            )
        targets = [name for name, m in backbone.named_modules() if isinstance(m, ADAPTED_TYPES)]
        if not targets:
            raise ValueError("the backbone has no Linear or Conv layer to adapt")
        if any(isinstance(m, LoraLayer | LoHaLayer) for m in backbone.modules()):
            raise ValueError("the backbone already holds LoRA/LoHa layers")
        self.base_parameters = list(backbone.parameters())
        trainable = [p.requires_grad for p in self.base_parameters]
        # A regex that matches the full names exactly: a list would match name suffixes too.
        pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
        alpha = alpha if alpha is not None else rank
        if method == "lora":
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern)
        else:
            config = LoHaConfig(r=rank, alpha=alpha, target_modules=pattern)
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
        self.method = method
        for p, flag in zip(self.base_parameters, trainable):
            p.requires_grad_(flag)  # peft freezes the base weights; COST trains them between teleports
        self.backbone = backbone
        self.layers = [m for m in backbone.modules() if isinstance(m, LoraLayer | LoHaLayer)]
        self.adapter_parameters = [
            p for layer in self.layers for name, p in layer.named_parameters() if ADAPTER in name.split(".")
        ]
        self.set_enabled(False)

    def set_enabled(self, enabled: bool) -> None:
        """Switch the adapter into (teleport) or out of (ordinary training) the forward pass."""
        for layer in self.layers:
            layer.enable_adapters(enabled)
        for p in self.adapter_parameters:
            p.requires_grad_(enabled)
        self.enabled = enabled

    @torch.no_grad()
    def merge_and_reset(self) -> list[torch.Tensor]:
        """W ← W + ΔW for every adapted layer, then reset the adapter to the identity (as peft
        initializes it). Returns Δθ aligned with ``base_parameters`` (zeros for
        parameters the adapter does not touch, e.g. biases and norms)."""
        deltas = {id(layer.base_layer.weight): layer.get_delta_weight(ADAPTER) for layer in self.layers}
        out = [deltas[id(p)].to(p.dtype) if id(p) in deltas else torch.zeros_like(p) for p in self.base_parameters]
        adapted = [(p, d) for p, d in zip(self.base_parameters, out) if id(p) in deltas]
        torch._foreach_add_([p for p, _ in adapted], [d for _, d in adapted])  # one multi-tensor update
        self._reset()
        return out

    def _reset(self) -> None:
        """Back to the identity: B = 0 (LoRA) or the second Hadamard factor's B = 0 (LoHa)."""
        for layer in self.layers:
            if self.method == "lora":
                layer.reset_lora_parameters(ADAPTER, True)
            else:
                layer.reset_adapter_parameters(ADAPTER)

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the base parameters (for ``restore``)."""
        return [p.detach().clone() for p in self.base_parameters]

    @torch.no_grad()
    def restore(self, snapshot: list[torch.Tensor]) -> None:
        """Put the base parameters back bit-exactly and reset the adapter."""
        if len(snapshot) != len(self.base_parameters):
            raise ValueError(f"snapshot has {len(snapshot)} tensors, the backbone {len(self.base_parameters)}")
        torch._foreach_copy_(self.base_parameters, snapshot)
        self._reset()
