"""SegNet, SegNet-MTAN and the dense tasks: the architecture the papers describe, what COST
adapts, the losses against hand computations; the CelebA CNN's size against its layer list."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cost_fast.experiments.dense_data import CITYSCAPES, NYUV2
from cost_fast.experiments.dense_tasks import DenseTask
from cost_fast.experiments.segnet import SegNet, SegNetMTAN
from cost_fast.models import CelebACNN


def convs(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]


def test_mtan_has_the_papers_layers() -> None:
    model = SegNetMTAN(NYUV2.tasks, width=64)
    body = convs(model.backbone.body)
    # VGG-16 SegNet: 13 encoder and 13 decoder convolutions, channels 64 .. 512
    assert len(body) == 26
    assert [m.out_channels for n, m in body if n.startswith("encoder")] == [64, 128, 256, 512, 512] + [
        64,
        128,
        256,
        256,
        512,
        512,
        512,
        512,
    ]
    # per task: 5 encoder and 5 decoder masks of two 1x1 convolutions; shared: 5 + 5 3x3 convolutions
    masks = [m for n, m in convs(model.backbone) if "attention" in n]
    assert len(masks) == 3 * 10 * 2 and all(m.kernel_size == (1, 1) for m in masks)
    assert len(convs(model.backbone.encoder_shared)) == 5 and len(convs(model.backbone.decoder_shared)) == 5
    # heads: 3x3 then 1x1 to 13 classes, 1 depth, 3 normal channels
    assert [[m.out_channels for _, m in convs(h)] for h in model.heads] == [[64, 13], [64, 1], [64, 3]]


def test_cost_adapts_the_shared_convolutions_not_the_attention_masks() -> None:
    model = SegNetMTAN(CITYSCAPES.tasks, width=4)
    adapted = [n for n, m in convs(model.backbone) if model.lora_targets(n, m)]
    # the public code's targets on its CityScapes SegNet-MTAN: 36 of the 76 backbone convolutions
    assert len(convs(model.backbone)) == 76 and len(adapted) == 36
    assert not any("attention" in n for n in adapted)


def test_outputs_and_losses() -> None:
    torch.manual_seed(0)
    model = SegNetMTAN(NYUV2.tasks, width=4)
    x = torch.randn(2, 3, 64, 96)
    seg, depth, normal = model(x)
    assert seg.shape == (2, 13, 64, 96) and depth.shape == (2, 1, 64, 96) and normal.shape == (2, 3, 64, 96)
    torch.testing.assert_close(seg.exp().sum(1), torch.ones(2, 64, 96))  # log-probabilities
    torch.testing.assert_close(normal.norm(dim=1), torch.ones(2, 64, 96))
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 60, 96))


def test_a_task_loss_reaches_only_its_own_attention_and_head() -> None:
    torch.manual_seed(0)
    model = SegNetMTAN(CITYSCAPES.tasks, width=4)
    x = torch.randn(2, 3, 32, 64)
    targets = [torch.randint(-1, 7, (2, 32, 64)), torch.rand(2, 1, 32, 64)]
    losses = model.task_losses(x, targets)
    grads = torch.autograd.grad(losses[1], list(model.parameters()), allow_unused=True)
    touched = {n for (n, _), g in zip(model.named_parameters(), grads) if g is not None and g.abs().sum() > 0}
    assert not any(
        n.startswith(("backbone.encoder_attention.0.", "backbone.decoder_attention.0.", "heads.0.")) for n in touched
    )
    assert any(n.startswith("backbone.encoder_attention.1.") for n in touched) and any(
        n.startswith("heads.1.") for n in touched
    )
    assert any(n.startswith("backbone.body.") for n in touched)


def test_segnet_puts_every_head_on_the_shared_decoder() -> None:
    model = SegNet(CITYSCAPES.tasks, width=4)
    assert len(convs(model.backbone)) == 26
    assert isinstance(model.backbone(torch.randn(1, 3, 32, 32)), torch.Tensor)


def test_dense_losses_by_hand() -> None:
    seg = DenseTask("segmentation", "segmentation", 2)
    log_p = torch.log(torch.tensor([[[[0.25, 0.5]], [[0.75, 0.5]]]]))  # (1, 2, 1, 2)
    # pixel 0: class 1 -> -log 0.75; pixel 1 unlabelled
    assert seg.loss(log_p, torch.tensor([[[1, -1]]])).item() == pytest.approx(-torch.log(torch.tensor(0.75)).item())
    assert seg.loss(log_p, torch.tensor([[[-1, -1]]])).item() == 0.0  # nothing labelled: 0, not NaN
    depth = DenseTask("depth", "depth")
    # |1.5 - 1| and |0 - 2| over the two pixels with depth; the missing one (0) is left out
    assert depth.loss(torch.tensor([[[[1.5, 9.0, 0.0]]]]), torch.tensor([[[[1.0, 0.0, 2.0]]]])).item() == pytest.approx(
        1.25
    )
    normal = DenseTask("normal", "normal")
    prediction = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[None, :, None, :]  # x and y unit vectors
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])[None, :, None, :]  # pixel 1 has no normal
    assert normal.loss(prediction, target).item() == pytest.approx(0.0)  # 1 - cos 0 over the one valid pixel
    with pytest.raises(ValueError, match="segmentation task has classes"):
        DenseTask("depth", "depth", classes=3)


def test_celeba_cnn_has_the_published_layers() -> None:
    model = CelebACNN(num_tasks=40, width=64)
    channels = [3, 64, 128, 128, 256, 256, 512, 512]
    conv = sum(9 * a * b for a, b in zip(channels, channels[1:]))  # 3x3 convolutions, no bias
    batch_norm = 2 * sum(channels[1:]) + 2 * 2 * 512
    linear = 2 * 512 * 512 + 40 * (512 + 1)  # two shared 512x512 (no bias) and the 40 heads
    assert sum(p.numel() for p in model.parameters()) == conv + batch_norm + linear


def test_unpooling_equals_max_unpool_in_values_and_gradients() -> None:
    from torch.nn import functional as F

    from cost_fast.experiments.segnet import unpool

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0  # a tied window: both pick the same (first) place
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    a = pooled.detach().requires_grad_()
    b = pooled.detach().requires_grad_()
    ours, theirs = unpool(a, indices), F.max_unpool2d(b, indices, 2, 2, output_size=x.shape[-2:])
    assert torch.equal(ours, theirs)
    weights = torch.randn_like(ours)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_the_models_run_under_deterministic_algorithms() -> None:
    torch.use_deterministic_algorithms(True)  # the conftest puts the mode back
    model = SegNetMTAN(CITYSCAPES.tasks, width=4)
    losses = model.task_losses(torch.randn(1, 3, 32, 64), [torch.randint(-1, 7, (1, 32, 64)), torch.rand(1, 1, 32, 64)])
    losses.sum().backward()
