"""Per-task gradients split at the backbone's output (``cost_fast.split_grads``) against the plain
per-task autograd loop, in float64: separate heads, one fused head, a backbone of several
outputs, the batched backbone passes; the steps where it must not split; what a COST step
launches and reads with it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from cost_fast import COST, TeleportSchedule, get_aggregator
from cost_fast.bench.launches import LaunchCount
from cost_fast.experiments.dense_data import CITYSCAPES
from cost_fast.experiments.segnet import SegNetMTAN
from cost_fast.grads import TaskGradients
from cost_fast.methods import list_aggregators
from cost_fast.models import CelebACNN, MultiTaskMLP, batch_task_losses
from cost_fast.split_grads import OutputCapture, SplitTaskGradients
from cost_fast.step import BaseStepConfig


class FusedHead(nn.Module):
    """One Linear head giving all K outputs."""

    def __init__(self, K: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, K)

    def task_losses(self, x, y):
        return ((self.head(self.backbone(x)) - y) ** 2).mean(0)


def loop_grads(model, losses_fn, K):
    losses = losses_fn()
    plain = TaskGradients(model.backbone.parameters(), K)
    return plain.compute(losses).clone()


def split_grads(model, losses_fn, K, mode="loop"):
    capture = OutputCapture(model.backbone)
    engine = SplitTaskGradients(model.backbone.parameters(), K, capture, mode=mode)
    G = engine.compute(losses_fn()).clone()  # the first step: computed both ways
    G2 = engine.compute(losses_fn()).clone()  # then split alone
    capture.close()
    return G, G2, engine


@pytest.mark.parametrize("mode", ["loop", "batched"])
@pytest.mark.parametrize("kind", ["separate heads", "fused head", "several outputs"])
def test_split_gradients_equal_the_plain_loop(kind, mode) -> None:
    torch.manual_seed(0)
    if kind == "separate heads":
        model, K = MultiTaskMLP(6, 5).double(), 5
        x, y = torch.randn(16, 6, dtype=torch.float64), (torch.rand(16, 5) > 0.5).double()
        losses_fn = lambda: model.task_losses(x, y)  # noqa: E731
    elif kind == "fused head":
        model, K = FusedHead(4).double(), 4
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
        losses_fn = lambda: model.task_losses(x, y)  # noqa: E731
    else:  # MTAN: one attention-gated feature per task
        model, K = SegNetMTAN(CITYSCAPES.tasks, width=2).double(), 2
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        targets = [torch.randint(-1, 7, (2, 32, 32)), torch.rand(2, 1, 32, 32, dtype=torch.float64)]
        losses_fn = lambda: model.task_losses(x, targets)  # noqa: E731
    expected = loop_grads(model, losses_fn, K)
    G, G2, engine = split_grads(model, losses_fn, K, mode)
    assert engine.split_off is None
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G2, expected, rtol=1e-12, atol=1e-14)


def test_a_backbone_called_twice_or_not_at_all_takes_the_plain_loop() -> None:
    torch.manual_seed(0)
    model = MultiTaskMLP(6, 3).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), (torch.rand(8, 3) > 0.5).double()
    capture = OutputCapture(model.backbone)
    engine = SplitTaskGradients(model.backbone.parameters(), 3, capture)
    engine.compute(model.task_losses(x, y))  # the first step's check
    twice = model.task_losses(x[:4], y[:4]) + model.task_losses(x[4:], y[4:])  # two forward passes
    expected = TaskGradients(model.backbone.parameters(), 3).compute(twice, retain_graph=True).clone()
    torch.testing.assert_close(engine.compute(twice), expected, rtol=1e-12, atol=0)
    with torch.no_grad():
        model.task_losses(x, y)  # a pass without grad is not captured
    once = model.task_losses(x, y)
    assert capture.calls == 1
    engine.compute(once)
    capture.close()


def test_a_loss_that_uses_the_backbone_weights_directly_is_found_and_not_split() -> None:
    torch.manual_seed(0)
    model = MultiTaskMLP(6, 3).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), (torch.rand(8, 3) > 0.5).double()
    penalty = lambda: model.task_losses(x, y) + torch.arange(3.0) * model.backbone[0].weight.square().sum()  # noqa: E731
    capture = OutputCapture(model.backbone)
    engine = SplitTaskGradients(model.backbone.parameters(), 3, capture)
    with pytest.warns(UserWarning, match="other than through its output"):
        G = engine.compute(penalty()).clone()
    assert engine.split_off is not None
    expected = loop_grads(model, penalty, 3)
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=0)  # the plain loop's G is the one kept
    torch.testing.assert_close(engine.compute(penalty()), expected, rtol=1e-12, atol=0)
    capture.close()


def test_a_model_with_the_capture_can_be_copied_and_pickled() -> None:
    model = MultiTaskMLP(6, 3)
    capture = OutputCapture(model.backbone)
    model.task_losses(torch.randn(4, 6), torch.ones(4, 3))
    copy.deepcopy(model)
    pickle.dumps(model)
    assert capture.calls == 1
    capture.close()


def celeba_cost(method: str, split: bool, K: int = 40):
    torch.manual_seed(0)
    model = CelebACNN(K, 8)
    x, y = torch.randn(16, 3, 64, 64), (torch.rand(16, K) > 0.5).float()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    base = get_aggregator(method, num_tasks=K) if list_aggregators()[method] == "loss" else get_aggregator(method)
    learned = list(base.parameters()) if isinstance(base, nn.Module) else []
    opt = torch.optim.Adam([*model.parameters(), *learned], lr=1e-3, foreach=True)
    cost = COST(
        model,
        model.backbone,
        base,
        opt,
        loss_fn=batch_task_losses,
        teleport_data=batches,
        schedule=TeleportSchedule(max_per_epoch=0),
        base_step=BaseStepConfig(split_at_output=split),
    )
    cost.step(batch_task_losses(model, batches[0]), batches[0])  # the first step (and the split's check)
    return model, cost, batches[1]


def test_a_cost_step_at_k40_launches_far_fewer_ops_split() -> None:
    counts = {}
    for split in (False, True):
        model, cost, batch = celeba_cost("fairgrad", split)
        losses = batch_task_losses(model, batch)
        with LaunchCount() as count:
            cost.backward(losses, batch)
        counts[split] = count.ops
    # the 40 heads' backward runs once, not 40 times (5,128 against 1,811 ops when measured)
    assert counts[True] < 0.5 * counts[False]


@pytest.mark.parametrize("method", sorted(list_aggregators()))
def test_a_cost_step_reads_the_device_at_most_twice(method) -> None:
    model, cost, batch = celeba_cost(method, True, K=4)
    losses = batch_task_losses(model, batch)
    with LaunchCount() as count:
        cost.backward(losses, batch)
    # the decision (with M for the solve) and the update's finiteness check, for every method
    assert count.reads <= 2, (method, count.scalar_reads)
