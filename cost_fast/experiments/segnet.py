"""SegNet and SegNet-MTAN for dense multi-task prediction (Badrinarayanan et al., 2017; Liu,
Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019), as the COST,
FairGrad and Nash-MTL experiments use them.

The shared network is a VGG-16-shaped SegNet: five encoder stages of 2, 2, 3, 3, 3 convolutions
(3x3, BatchNorm, ReLU) with c = (w, 2w, 4w, 8w, 8w) channels (w = 64 in the papers), each
followed by a 2x2 max-pool that remembers its indices, and five decoder stages that mirror them
(max-unpool with those indices, then 3, 3, 3, 2, 2 convolutions). Inputs need H and W divisible
by 32.

MTAN adds one attention network per task on top of it. For task k, encoder stage i with first
convolution output u_i and stage output s_i:

    a_i = A^enc_{k,i}(u_i (i = 0) or [u_i, p_{i-1}]) ⊙ s_i,    p_i = maxpool(E_i(a_i)),

and, from q = p_4, decoder stage l (l = 4, ..., 0) with unpooled input v_l and stage output t_l:

    q = D_l(upsample₂(q)),    q = A^dec_{k,l}([v_l, q]) ⊙ t_l,

where the masks A (1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid) are the task's own and the
convolutions E_i, D_l (3x3, BN, ReLU) are shared by the tasks; the last q is task k's feature.
Each task's head is a 3x3 then a 1x1 convolution. ``SegNet`` (no attention) puts every head on
the decoder's output.

For COST, ``backbone`` is everything but the heads (the attention included, as the public code's
``shared_parameters``), and ``lora_targets`` adapts the shared SegNet and E/D convolutions, not
the task-specific attention masks (the public code's ``get_lora_target_modules``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from cost_fast.checks import check_int
from cost_fast.experiments.dense_tasks import DenseTask

ENCODER_CONVS = (2, 2, 3, 3, 3)  # convolutions per encoder stage (the decoder mirrors them)
ATTENTION_PREFIXES = ("encoder_attention.", "decoder_attention.")


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def attention_mask(c_in: int, c_out: int) -> nn.Sequential:
    """MTAN's mask: 1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid (values in (0, 1))."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def prediction_head(c_in: int, c_out: int) -> nn.Sequential:
    """A task's head: a 3x3 convolution keeping the channels, then a 1x1 one to the outputs."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 1))


def unpool(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``F.max_unpool2d(values, indices, 2, 2)`` for the indices of a 2x2, stride-2 max-pool of
    an input of twice the size: each value goes back to the place its window's maximum came from,
    zeros elsewhere. Written as an expand and a comparison (the same values and gradients), because
    ``max_unpool2d`` has no deterministic implementation and so fails under
    ``torch.use_deterministic_algorithms(True)``, which Lightning's ``deterministic=True`` sets."""
    b, c, h, w = values.shape

    def spread(x: torch.Tensor) -> torch.Tensor:  # each entry over its 2x2 window
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)

    places = torch.arange(4 * h * w, device=values.device).view(2 * h, 2 * w)
    return spread(values) * (spread(indices) == places)


def initialise(module: nn.Module) -> None:
    """Xavier-normal convolution and linear weights, zero biases, BatchNorm at identity (the
    papers' initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegNetBody(nn.Module):
    """The shared SegNet encoder-decoder (module docstring). ``forward(x)`` returns the
    decoder's output; ``features(x)`` also the intermediate maps MTAN's attention reads."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        check_int("width", width, 1)
        c = (width, 2 * width, 4 * width, 8 * width, 8 * width)
        self.channels = c
        self.encoder_first = nn.ModuleList(conv_block(3 if i == 0 else c[i - 1], c[i]) for i in range(5))
        self.encoder_rest = nn.ModuleList(
            nn.Sequential(*(conv_block(c[i], c[i]) for _ in range(ENCODER_CONVS[i] - 1))) for i in range(5)
        )
        # decoder stage l undoes encoder stage l: from c[l] channels to those of stage l - 1
        self.decoder_first = nn.ModuleList(conv_block(c[l], c[max(l - 1, 0)]) for l in range(5))
        self.decoder_rest = nn.ModuleList(
            nn.Sequential(*(conv_block(c[max(l - 1, 0)], c[max(l - 1, 0)]) for _ in range(ENCODER_CONVS[l] - 1)))
            for l in range(5)
        )

    def features(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``first[i]``, ``stage[i]``: encoder stage i's first convolution and output;
        ``unpooled[l]``, ``decoded[l]``: decoder stage l's unpooled input and output."""
        if x.dim() != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"SegNet takes images (B, 3, H, W) with H and W divisible by 32, got {tuple(x.shape)}")
        first, stage, indices = [], [], []
        h = x
        for i in range(5):
            first.append(self.encoder_first[i](h))
            stage.append(self.encoder_rest[i](first[i]))
            h, index = F.max_pool2d(stage[i], 2, 2, return_indices=True)
            indices.append(index)
        unpooled, decoded = [None] * 5, [None] * 5
        for l in reversed(range(5)):
            unpooled[l] = unpool(h, indices[l])
            decoded[l] = self.decoder_rest[l](self.decoder_first[l](unpooled[l]))
            h = decoded[l]
        return {"first": first, "stage": stage, "unpooled": unpooled, "decoded": decoded}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output (B, w, H, W)."""
        return self.features(x)["decoded"][0]


class MTANBackbone(nn.Module):
    """The shared SegNet with one MTAN attention network per task (module docstring);
    ``forward(x)`` returns the K task features, each (B, w, H, W)."""

    def __init__(self, num_tasks: int, width: int = 64) -> None:
        super().__init__()
        check_int("num_tasks", num_tasks, 1)
        self.body = SegNetBody(width)
        c = self.body.channels
        # shared: E_i from stage i's channels to stage i + 1's (the last keeps them); D_l from
        # stage l's channels to those of decoder stage l's output (the first, l = 4, keeps them)
        self.encoder_shared = nn.ModuleList(conv_block(c[i], c[min(i + 1, 4)]) for i in range(5))
        out = [c[max(l - 1, 0)] for l in range(5)]
        d_out = [c[4] if l == 4 else out[l] for l in range(5)]
        self.decoder_shared = nn.ModuleList(conv_block(c[l], d_out[l]) for l in range(5))
        self.encoder_attention = nn.ModuleList(
            nn.ModuleList(attention_mask(c[i] if i == 0 else 2 * c[i], c[i]) for i in range(5))
            for _ in range(num_tasks)
        )
        self.decoder_attention = nn.ModuleList(
            nn.ModuleList(attention_mask(c[l] + d_out[l], out[l]) for l in range(5)) for _ in range(num_tasks)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The K task features."""
        f = self.body.features(x)
        features = []
        for enc_masks, dec_masks in zip(self.encoder_attention, self.decoder_attention):
            p = None
            for i in range(5):
                mask_input = f["first"][i] if i == 0 else torch.cat([f["first"][i], p], dim=1)
                a = enc_masks[i](mask_input) * f["stage"][i]
                p = F.max_pool2d(self.encoder_shared[i](a), 2, 2)
            q = p
            for l in reversed(range(5)):
                q = F.interpolate(q, size=f["unpooled"][l].shape[-2:], mode="bilinear", align_corners=True)
                q = self.decoder_shared[l](q)
                q = dec_masks[l](torch.cat([f["unpooled"][l], q], dim=1)) * f["decoded"][l]
            features.append(q)
        return tuple(features)


class DenseMultiTaskNet(nn.Module):
    """A shared ``backbone`` and one prediction head per dense task (``heads``), with
    ``task_losses(x, targets)`` for COST's ``loss_fn``. Base of ``SegNet`` and ``SegNetMTAN``."""

    def __init__(self, backbone: nn.Module, tasks: Sequence[DenseTask], width: int) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a dense multi-task network needs at least one task")
        self.tasks = tuple(tasks)
        self.backbone = backbone
        self.heads = nn.ModuleList(prediction_head(width, task.channels) for task in self.tasks)
        initialise(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each task's prediction (``DenseTask.predict``), in task order."""
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = (features,) * len(self.tasks)
        return [task.predict(head(h)) for task, head, h in zip(self.tasks, self.heads, features)]

    def task_losses(self, x: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """The K task losses (``DenseTask.loss``), shape (K,)."""
        if len(targets) != len(self.tasks):
            raise ValueError(f"expected {len(self.tasks)} targets (one per task), got {len(targets)}")
        predictions = self(x)
        return torch.stack([task.loss(p, t) for task, p, t in zip(self.tasks, predictions, targets)])

    @staticmethod
    def lora_targets(name: str, layer: nn.Module) -> bool:
        """COST's ``AdapterConfig.targets``: every backbone convolution but the attention masks."""
        return not name.startswith(ATTENTION_PREFIXES)


class SegNet(DenseMultiTaskNet):
    """Shared SegNet, every head on its decoder output (module docstring)."""

    def __init__(self, tasks: Sequence[DenseTask], width: int = 64) -> None:
        super().__init__(SegNetBody(width), tasks, width)


class SegNetMTAN(DenseMultiTaskNet):
    """SegNet with MTAN's task attention (module docstring): the papers' model."""

    def __init__(self, tasks: Sequence[DenseTask], width: int = 64) -> None:
        super().__init__(MTANBackbone(len(tasks), width), tasks, width)
