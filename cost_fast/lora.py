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

    W ← W + ΔW   (per adapted layer, ΔW from peft's ``get_delta_weight``: s·BA for LoRA).

``snapshot``/``restore`` copy the adapted weights for a bit-exact rollback.

Only layers whose weight requires grad are adapted: a layer the user froze is never changed;
``targets`` narrows the choice further (the public SegNet-MTAN code adapts its shared convs but
not its attention convs).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from cost_fast.checks import check_int

ADAPTER = "cost_teleport"
ADAPTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
METHODS = ("lora", "loha")


@contextlib.contextmanager
def _global_rng_untouched(module: nn.Module) -> Iterator[None]:
    """Run a block that draws from torch's global generators (peft's initialization) without
    moving them: the CPU generator and those of the CUDA devices ``module`` lives on."""
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


class TeleportAdapter:
    """A rank-``rank`` adapter on every trainable Linear/Conv layer of ``backbone``.

    Args:
        backbone: the shared module; its parameters keep their identity and ``requires_grad``,
            and its modules are its own again when this constructor returns.
        rank: adapter rank r ≥ 1 (default 5, as COST). alpha: its alpha (default r, scale 1).
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
    """

    def __init__(
        self,
        backbone: nn.Module,
        rank: int = 5,
        alpha: float | None = None,
        method: str = "lora",
        generator: torch.Generator | None = None,
        targets: Callable[[str, nn.Module], bool] | None = None,
    ) -> None:
        from peft import LoHaConfig, LoraConfig, inject_adapter_in_model
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lora.layer import LoraLayer

        check_int("rank", rank, 1)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (OFT is not supported), got {method!r}")
        if isinstance(backbone, ADAPTED_TYPES):
            raise ValueError(
                "the backbone is itself a single layer, which peft cannot adapt in place: "
                "wrap it, e.g. nn.Sequential(layer)"
            )
        if any(isinstance(m, LoraLayer | LoHaLayer) for m in backbone.modules()):
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
        self.base_parameters = [p for p in backbone.parameters() if p.requires_grad]
        flags = [(p, p.requires_grad) for p in backbone.parameters()]
        had_config = hasattr(backbone, "peft_config")
        # A regex that matches the full names exactly: a list would match name suffixes too.
        pattern = "^(" + "|".join(re.escape(t) for t in chosen) + ")$"
        alpha = alpha if alpha is not None else rank
        if method == "lora":
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern)
        else:
            config = LoHaConfig(r=rank, alpha=alpha, target_modules=pattern)
        with _global_rng_untouched(backbone):
            inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
        if not had_config and hasattr(backbone, "peft_config"):
            del backbone.peft_config  # peft's bookkeeping; the backbone must look untouched
        for p, flag in flags:
            p.requires_grad_(flag)  # peft freezes the base weights; COST trains them between teleports
        self.method = method
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

    def _put(self, *, original: bool) -> None:
        for parent, attr, layer, base in self._slots:
            setattr(parent, attr, base if original else layer)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Swap the adapter layers into the backbone for the block (a teleport) and the
        original layers back afterwards, also on error."""
        if self.is_attached:
            raise RuntimeError("the teleport adapter is already attached")
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
        deltas = {id(layer.base_layer.weight): layer.get_delta_weight(ADAPTER) for layer in self.layers}
        out = [deltas[id(p)].to(p.dtype) if id(p) in deltas else torch.zeros_like(p) for p in self.base_parameters]
        torch._foreach_add_(self.adapted_weights, [deltas[id(w)].to(w.dtype) for w in self.adapted_weights])
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the identity, as peft initializes it (B = 0 for LoRA; the second Hadamard
        factor's B = 0 for LoHa), with every nonzero factor redrawn from ``self.generator``
        as U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming_uniform(a=√5))."""
        with _global_rng_untouched(self.backbone):
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
