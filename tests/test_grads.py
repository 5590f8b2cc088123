"""TaskGradients against per-task torch.autograd.grad, in both modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cost_fast import TaskGradients, gram_stats
from cost_fast.models import CelebACNN

MODES = ["loop", "batched"]


class BranchyCNN(nn.Module):
    """Shared conv trunk plus a shared side branch that the last head does not use."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.side = nn.Linear(32, 16)
        self.heads = nn.ModuleList(nn.Linear(48, 1) for _ in range(num_tasks - 1))
        self.last_head = nn.Linear(32, 1)

    def shared(self) -> list[torch.Tensor]:
        return [*self.trunk.parameters(), *self.side.parameters()]

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        both = torch.cat([h, torch.tanh(self.side(h))], dim=1)
        logits = [head(both) for head in self.heads] + [self.last_head(h)]
        return ((torch.cat(logits, dim=1) - y) ** 2).mean(dim=0)


def expected_grads(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for i in range(losses.shape[0]):
        g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)])
        )
    return torch.stack(rows)


def make_problem(K: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = BranchyCNN(K)
    x, y = torch.randn(6, 3, 9, 9), torch.randn(6, K)
    return model, x, y


@pytest.mark.parametrize("mode", MODES)
def test_matches_per_task_autograd(mode: str) -> None:
    model, x, y = make_problem()
    engine = TaskGradients(model.shared(), num_tasks=4, mode=mode)
    losses = model.task_losses(x, y)
    want = expected_grads(losses, model.shared())
    got = engine.compute(losses)
    assert got.shape == (4, engine.num_params) == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the last head never reaches the side branch: its block is exactly zero
    side = sum(p.numel() for p in model.side.parameters())
    assert torch.equal(got[3, -side:], torch.zeros(side))
    assert got[0, -side:].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_buffer_is_reused_and_views_alias_it(mode: str) -> None:
    model, x, y = make_problem()
    engine = TaskGradients(model.shared(), num_tasks=4, mode=mode)
    ptr = engine.grads.data_ptr()
    first = engine.compute(model.task_losses(x, y)).clone()
    second = engine.compute(model.task_losses(2 * x, y))
    assert second.data_ptr() == ptr and not torch.equal(first, second)
    for view, p in zip(engine.views, engine.params):
        assert view.shape == (4, *p.shape)
        assert view.untyped_storage().data_ptr() == engine.grads.untyped_storage().data_ptr()


@pytest.mark.parametrize("mode", MODES)
def test_modes_agree_on_celeba_cnn_with_batchnorm(mode: str) -> None:
    torch.manual_seed(0)
    model = CelebACNN(num_tasks=5, width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 5))
    losses = model.task_losses(x, y)
    params = list(model.backbone.parameters())
    want = expected_grads(losses, params)
    got = TaskGradients(params, num_tasks=5, mode=mode).compute(losses)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_retain_graph() -> None:
    for mode in MODES:
        model, x, y = make_problem()
        engine = TaskGradients(model.shared(), num_tasks=4, mode=mode)
        losses = model.task_losses(x, y)
        engine.compute(losses, retain_graph=True)
        losses.sum().backward()  # graph still there for the heads' backward
        losses = model.task_losses(x, y)
        engine.compute(losses)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            losses.sum().backward()


def test_frozen_parameters_are_skipped() -> None:
    model, x, y = make_problem()
    model.trunk[0].weight.requires_grad_(False)
    engine = TaskGradients(model.shared(), num_tasks=4)
    assert engine.frozen == [model.trunk[0].weight]
    trainable = [p for p in model.shared() if p.requires_grad]
    assert engine.num_params == sum(p.numel() for p in trainable)
    losses = model.task_losses(x, y)
    want = expected_grads(losses, trainable)
    torch.testing.assert_close(engine.compute(losses), want)


@pytest.mark.parametrize("mode", MODES)
def test_combine_writes_weighted_gradient(mode: str) -> None:
    model, x, y = make_problem()
    params = model.shared()
    engine = TaskGradients(params, num_tasks=4, mode=mode)
    losses = model.task_losses(x, y)
    w = torch.tensor([0.5, -1.0, 2.0, 0.25])
    want = torch.autograd.grad((w * losses).sum(), params, retain_graph=True)
    engine.compute(losses)
    d = engine.combine(w)
    torch.testing.assert_close(d, torch.cat([g.reshape(-1) for g in want]))
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g)
    # an optimizer's zero_grad(set_to_none=True) drops .grad; combine re-attaches it
    torch.optim.SGD(params, lr=0.1).zero_grad(set_to_none=True)
    engine.combine(2 * w)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, 2 * g)
    assert engine.combine(w, write_grad=False) is engine.combined


def test_stats_of_buffer() -> None:
    model, x, y = make_problem()
    engine = TaskGradients(model.shared(), num_tasks=4)
    engine.compute(model.task_losses(x, y))
    torch.testing.assert_close(
        engine.stats(backend="torch").gram, gram_stats(engine.grads.clone(), backend="torch").gram
    )
    # the Triton kernel runs on CUDA tensors, or on CPU ones under the interpreter (conftest)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_stats = gram_stats(engine.grads.to(device), backend="triton")
    torch.testing.assert_close(triton_stats.gram.cpu(), engine.stats(backend="torch").gram, rtol=1e-5, atol=1e-6)


def test_single_task() -> None:
    model, x, y = make_problem(K=2)
    losses = model.task_losses(x, y)[:1]
    for mode in MODES:
        engine = TaskGradients(model.shared(), num_tasks=1, mode=mode)
        torch.testing.assert_close(engine.compute(losses, retain_graph=True), expected_grads(losses, model.shared()))
        assert not bool(engine.stats().trigger)


def test_bad_constructor_arguments() -> None:
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match="num_tasks"):
        TaskGradients(model.shared(), num_tasks=0)
    with pytest.raises(TypeError, match="num_tasks"):
        TaskGradients(model.shared(), num_tasks=2.0)
    with pytest.raises(ValueError, match="mode"):
        TaskGradients(model.shared(), num_tasks=2, mode="vmap")
    with pytest.raises(ValueError, match="empty"):
        TaskGradients([], num_tasks=2)
    frozen = [torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError, match="requires grad"):
        TaskGradients(frozen, num_tasks=2)
    with pytest.raises(TypeError, match="params\\[1\\]"):
        TaskGradients([model.side.weight, "bias"], num_tasks=2)
    with pytest.raises(TypeError, match="iterable"):
        TaskGradients(model.side.weight, num_tasks=2)
    with pytest.raises(ValueError, match="more than once"):
        TaskGradients([model.side.weight, model.side.weight], num_tasks=2)
    with pytest.raises(ValueError, match="dtypes"):
        TaskGradients([model.side.weight, torch.zeros(2, dtype=torch.float64, requires_grad=True)], num_tasks=2)


def test_bad_losses_and_weights() -> None:
    model, x, y = make_problem()
    engine = TaskGradients(model.shared(), num_tasks=4)
    losses = model.task_losses(x, y)
    with pytest.raises(ValueError, match="1-D tensor of 4"):
        engine.compute(losses[None])
    with pytest.raises(ValueError, match="1-D tensor of 4"):
        engine.compute(losses[:3])
    with pytest.raises(TypeError, match="1-D tensor"):
        engine.compute([losses[0], losses[1]])
    with pytest.raises(ValueError, match="require grad"):
        engine.compute(losses.detach())
    with pytest.raises(TypeError, match="floating"):
        engine.compute(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        engine.combine(torch.ones(3))
    with pytest.raises(TypeError, match="weights"):
        engine.combine([1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("mode", MODES)
def test_segnet_three_dense_tasks(mode: str) -> None:
    from cost_fast.models import SegNetMTL, synthetic_nyuv2

    torch.manual_seed(0)
    model = SegNetMTL(width=4)
    x, targets = synthetic_nyuv2(2, size=16)
    losses = model.task_losses(x, targets)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    params = list(model.backbone.parameters())
    want = expected_grads(losses, params)
    torch.testing.assert_close(
        TaskGradients(params, num_tasks=3, mode=mode).compute(losses), want, rtol=1e-4, atol=1e-6
    )
    # masks: no valid depth or normal pixel gives a zero loss for that task
    seg, depth, normal = targets
    none = model.task_losses(x, (seg, torch.zeros_like(depth), torch.zeros_like(normal)))
    assert none[1] == 0 and none[2] == 0
