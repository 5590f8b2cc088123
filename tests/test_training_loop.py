"""COST in the loops people really write: gradient accumulation, an AMP GradScaler, autocast, a
shuffled DataLoader as teleport data, bad teleport data, skipped steps, checks before any work,
checkpoints that are validated before they load, and a start-up that does not import peft."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from tug import K, Tug, build, make_method, tug_batches

from cost_fast import (
    COST,
    BaseStepConfig,
    TeleportConfig,
    TeleportSchedule,
    get_aggregator,
    list_aggregators,
)
from cost_fast.models import batch_task_losses

METHODS = sorted(list_aggregators())


def plain_micro_batch_gradients(name: str, model, method, batch) -> dict[int, torch.Tensor]:
    """One micro-batch's gradient of every parameter (the method's learned ones included), the
    plain way: per-task gradients by autograd, the method's documented API, no COST."""
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    learned = list(method.parameters()) if isinstance(method, torch.nn.Module) else []
    losses = batch_task_losses(model, batch)
    G = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    )
    kind = list_aggregators()[name]
    if kind == "gram":
        w = method.weights(G @ G.T).to(G)
        d = G.T @ w
        head_total, learned_total = losses @ w, None
    elif kind == "grads":
        d = method.aggregate(G).to(G)
        head_total, learned_total = losses.sum(), None
    else:
        total = method(losses)
        (w,) = torch.autograd.grad(total, losses, retain_graph=True)
        d = G.T @ w
        head_total, learned_total = total, total
    grads = dict(zip(map(id, heads), torch.autograd.grad(head_total, heads, retain_graph=True)))
    if learned:
        grads |= dict(zip(map(id, learned), torch.autograd.grad(learned_total, learned)))
    offset = 0
    for p in shared:
        grads[id(p)] = d[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return grads


# -- 1. accumulation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_backward_accumulates_micro_batches_as_torch_does(name: str) -> None:
    model, batches, cost, opt = build(name)
    plain_model, plain_method = copy.deepcopy(model), make_method(name)
    cost.step(batch_task_losses(model, batches[3]), batches[3])  # some history: a method's state
    plain_method.load_state_dict(copy.deepcopy(cost.base.state_dict()))
    plain_model.load_state_dict(model.state_dict())
    opt.zero_grad()
    expected: dict[int, torch.Tensor] = {}
    for batch in batches[:2]:
        assert cost.backward(batch_task_losses(model, batch), batch).skipped is None
        for key, g in plain_micro_batch_gradients(name, plain_model, plain_method, batch).items():
            expected[key] = expected[key] + g if key in expected else g
    mine = list(model.parameters()) + (list(cost.base.parameters()) if isinstance(cost.base, torch.nn.Module) else [])
    theirs = list(plain_model.parameters()) + (
        list(plain_method.parameters()) if isinstance(plain_method, torch.nn.Module) else []
    )
    for p, q in zip(mine, theirs, strict=True):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, expected[id(q)], rtol=1e-9, atol=1e-12, msg=name)


def test_a_skipped_micro_batch_adds_nothing_to_the_accumulated_gradient() -> None:
    model, batches, cost, opt = build("mgda")
    opt.zero_grad()
    cost.backward(batch_task_losses(model, batches[0]), batches[0])
    kept = [p.grad.clone() for p in model.parameters()]
    poisoned = batch_task_losses(model, batches[1]) * torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)
    assert cost.backward(poisoned, batches[1]).skipped is not None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), kept))


def tug_of_war(model, batch):
    """The backbone's summed output pulled toward the four targets at once: some task always
    opposes the mean gradient, so the trigger fires at every step."""
    x, targets = batch
    return (model.backbone(x).sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


def test_a_teleport_waits_for_the_end_of_an_accumulation() -> None:
    # teleports allowed from step 4 on; the accumulation's first micro-batch is step 3
    model, batches, cost, opt = build(
        "mgda", schedule=TeleportSchedule(max_per_epoch=2, start_step=4, steps_per_epoch=100), loss_fn=tug_of_war
    )
    for batch in batches[:3]:
        cost.step(tug_of_war(model, batch), batch)
    opt.zero_grad()
    cost.backward(tug_of_war(model, batches[3]), batches[3])
    backbone = [p.detach().clone() for p in model.backbone.parameters()]
    second = cost.backward(tug_of_war(model, batches[0]), batches[0])
    assert second.trigger and not second.attempted_teleport  # it would move the point of the first
    assert all(torch.equal(p, b) for p, b in zip(model.backbone.parameters(), backbone))
    opt.step()
    opt.zero_grad()
    third = cost.backward(tug_of_war(model, batches[0]), batches[0])
    assert third.trigger and third.attempted_teleport  # a new accumulation: the teleport runs


# -- 2. GradScaler ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_a_grad_scalers_scale_never_changes_a_result(name: str) -> None:
    runs = []
    for scaled in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
        model, batches, cost, opt = build(name, scaler=scaler)
        for batch in batches:
            opt.zero_grad()
            info = cost.backward(batch_task_losses(model, batch), batch)
            assert info.skipped is None
            if scaler is not None:
                scaler.unscale_(opt)
            grads = [p.grad.clone() for p in model.parameters()]
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        runs.append((grads, [p.detach().clone() for p in model.parameters()]))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}: unscaled gradients")
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}: parameters")


def test_an_overflow_under_a_grad_scaler_is_the_scalers_to_skip() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # float32 gradients overflow at this scale
    model, batches, cost, opt = build("fairgrad", dtype=torch.float32, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert info.skipped is not None and "GradScaler" in info.skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 1e38  # the scaler saw the overflow and lowered its scale
    assert not opt.state  # no optimizer step was taken
    with pytest.raises(ValueError, match="GradScaler"):
        build(
            "fairgrad",
            scaler=scaler,
            base_step=BaseStepConfig(nonfinite="raise"),
        )
    with pytest.raises(TypeError, match="GradScaler"):
        build("fairgrad", scaler=2.0**16)


# -- 3. autocast -----------------------------------------------------------------------------


def test_cost_inside_autocast_is_refused_before_any_work() -> None:
    model, batches, cost, opt = build("fairgrad", dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = batch_task_losses(model, batches[0]).float()
        with pytest.raises(RuntimeError, match="outside"):
            cost.step(losses, batches[0])
    assert cost.step_count == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    info = cost.step(losses, batches[0])  # the supported placement: losses inside, COST outside
    assert info.skipped is None and any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- 4. the caller's random stream -----------------------------------------------------------


def test_a_shuffled_dataloader_as_teleport_data_leaves_the_callers_generator_alone() -> None:
    torch.manual_seed(3)
    model = Tug()
    batches = tug_batches(3, 4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=loader,
        teleport=TeleportConfig(rounds=1),
        schedule=TeleportSchedule(start_step=1),
    )
    state = torch.get_rng_state()
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    assert sum(i.attempted_teleport for i in infos) >= 1
    assert torch.equal(torch.get_rng_state(), state)


# -- 5. non-finite teleport data -------------------------------------------------------------


@pytest.mark.parametrize("semantics", ["public", "paper"])
def test_a_nan_in_the_teleport_data_never_reaches_the_backbone(semantics: str) -> None:
    torch.manual_seed(4)
    model = Tug()
    batches = tug_batches(4, 4)
    x, y = batches[1]
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        opt,
        loss_fn=batch_task_losses,
        teleport_data=[batches[0], (bad, y)],
        semantics=semantics,
        teleport=TeleportConfig(rounds=1, guard=False),
        schedule=TeleportSchedule(start_step=1, steps_per_epoch=4),
    )
    infos = []
    for batch in batches * 2:
        infos.append(cost.step(batch_task_losses(model, batch), batch))
    attempted = [i for i in infos if i.attempted_teleport]
    assert attempted and all(i.rolled_back and i.rollback_reason == "non-finite" for i in attempted)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert infos[-1].skipped is None  # training goes on


# -- 6. skipped steps change nothing ---------------------------------------------------------


def test_a_skipped_step_keeps_htrs_last_update() -> None:
    model, batches, cost, opt = build(
        "mgda",
        schedule=TeleportSchedule(max_per_epoch=1, start_step=100),
    )

    def poisoned(m, batch):  # finite losses, the first head's gradient NaN (0·sqrt(0))
        w = m.heads[0].weight
        nan_gradient = 0 * (w - w.detach()).abs().sqrt().sum()
        return batch_task_losses(m, batch) + torch.stack([nan_gradient, *[nan_gradient.detach()] * (K - 1)])

    assert cost.step(poisoned(model, batches[0]), batches[0]).skipped is not None
    assert cost.state_dict()["htr"]["last_update"] is None  # a first step that is skipped leaves none
    cost.step(batch_task_losses(model, batches[1]), batches[1])
    last = cost.state_dict()["htr"]["last_update"]
    assert last is not None and torch.isfinite(last).all()
    assert cost.step(poisoned(model, batches[2]), batches[2]).skipped is not None
    assert torch.equal(cost.state_dict()["htr"]["last_update"], last)


def test_large_finite_gradients_are_not_called_non_finite() -> None:
    model, batches, cost, opt = build("mgda", dtype=torch.float32)

    def huge_heads(m, batch):  # + 0 in value, a head gradient of 1e20 per entry: its norm² overflows float32
        big = torch.stack([1e20 * head.weight.sum() for head in m.heads])
        return batch_task_losses(m, batch) + (big - big.detach())

    info = cost.step(huge_heads(model, batches[0]), batches[0])
    assert info.skipped is None
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 7. checks before work -------------------------------------------------------------------


def test_bad_settings_are_refused_with_their_name_before_any_work() -> None:
    model, batches, cost, opt = build("fairgrad")
    args = (model, model.backbone, get_aggregator("mgda"), opt)
    with pytest.raises(ValueError, match=r"adapter must be one of \('lora', 'loha', 'rescale'\)"):
        COST(*args, loss_fn=batch_task_losses, teleport_data=batches, adapter="lora2")
    with pytest.raises(ValueError, match="teleport_data is empty"):
        COST(*args, loss_fn=batch_task_losses, teleport_data=[])
    with pytest.raises(ValueError, match="num_tasks=K"):
        get_aggregator("uw")
    with pytest.warns(UserWarning, match="HTR is off"):
        build(
            "fairgrad",
            optimizer=torch.optim.SGD,
            schedule=TeleportSchedule(max_per_epoch=1),
        )


def test_a_loss_fn_of_the_wrong_shape_is_named_at_the_first_step() -> None:
    torch.manual_seed(0)
    model = Tug().double()
    batches = tug_batches(0, 2, torch.float64)
    opt = torch.optim.Adam(model.parameters())
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mgda"),
        opt,
        loss_fn=lambda m, b: batch_task_losses(m, b).sum(),
        teleport_data=batches,
    )
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"loss_fn\(model, batch\) must return the 4 task losses"):
        cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and cost.step_count == 0
    assert torch.equal(torch.get_rng_state(), rng) and model.training


# -- 9. start-up -----------------------------------------------------------------------------


def test_the_fast_path_never_imports_peft() -> None:
    """Importing peft takes seconds (it imports transformers): only the yardstick uses it."""
    script = """
import sys, torch
from tug import Tug, tug_batches
from cost_fast import COST, TaskGradients, TeleportSchedule, get_aggregator, gram_stats
from cost_fast.models import batch_task_losses
torch.manual_seed(0)  # an initialization on which the trigger fires
model, batches = Tug(), tug_batches(0, 2)
engine = TaskGradients(model.backbone.parameters(), num_tasks=4)
gram_stats(engine.compute(batch_task_losses(model, batches[0])))
def cost(**kwargs):
    return COST(model, model.backbone, get_aggregator("fairgrad"), torch.optim.Adam(model.parameters()),
                loss_fn=batch_task_losses, teleport_data=batches, **kwargs)
without = cost(schedule=TeleportSchedule(max_per_epoch=0))
without.step(batch_task_losses(model, batches[0]), batches[0])
with_teleports = cost()
infos = [with_teleports.step(batch_task_losses(model, b), b) for b in batches * 4]
assert any(info.attempted_teleport for info in infos), "no teleport ran"
assert "peft" not in sys.modules, "peft was imported"
print("ok")
"""
    tests = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tests, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- loaders: the caller's iteration and generators --------------------------------------------


def loader_run(teleports: int, persistent: bool) -> tuple[list[list[int]], torch.Tensor, dict]:
    """Three epochs of COST over a shuffled DataLoader that is also the teleport data (as the
    public code does); the sample order of each epoch, the loader's generator state after, and
    what COST did."""
    from torch.utils.data import DataLoader, TensorDataset
    from tug import TARGETS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    dataset = TensorDataset(x, torch.tensor(TARGETS).expand(256, K), torch.arange(256))
    torch.manual_seed(1)
    model = Tug()
    shuffle = torch.Generator().manual_seed(5)
    loader = DataLoader(
        dataset,
        batch_size=32,
        shuffle=True,
        generator=shuffle,
        num_workers=1 if persistent else 0,
        persistent_workers=persistent,
    )

    def loss_fn(m, batch):
        return m.task_losses(batch[0], batch[1])

    cost = COST(
        model,
        model.backbone,
        "mgda",
        torch.optim.Adam(model.parameters(), lr=1e-2),
        loss_fn=loss_fn,
        teleport_data=loader,
        schedule=TeleportSchedule(max_per_epoch=teleports, start_step=2),
        teleport=TeleportConfig(rounds=1),
    )
    orders = []
    for _ in range(3):
        order = []
        for batch in loader:
            cost.step(loss_fn(model, batch), batch)
            order += batch[2].tolist()
        orders.append(order)
    return orders, shuffle.get_state(), cost.tally.summary()


@pytest.mark.parametrize("persistent", [False, True])
def test_a_teleport_over_the_training_loader_leaves_its_epochs_and_generator_as_without_cost(persistent) -> None:
    """A teleport mid-epoch over the loader being iterated: every epoch still sees all 256
    samples, in the order a run without teleports sees them (the loader's own generator drives
    the shuffle), and that generator ends where it would without COST."""
    orders, state, done = loader_run(1, persistent)
    plain_orders, plain_state, plain = loader_run(0, persistent)
    assert done["teleported"] + done["rolled_back"] == 3 and plain["teleported"] + plain["rolled_back"] == 0
    assert all(sorted(order) == list(range(256)) for order in orders)  # whole epochs
    assert orders == plain_orders and torch.equal(state, plain_state)


def test_a_loss_fn_may_return_the_losses_as_step_takes_them() -> None:
    """``loss_fn`` returning a dict (or a list) works as one returning a tensor: same run."""
    runs = []
    for form in ("tensor", "dict", "list"):

        def loss_fn(m, batch, form=form):
            losses = batch_task_losses(m, batch)
            if form == "dict":
                return {f"task{i}": loss for i, loss in enumerate(losses)}
            return list(losses) if form == "list" else losses

        model, batches, cost, _ = build("mgda", loss_fn=loss_fn, schedule=TeleportSchedule(start_step=1))
        infos = [cost.step(loss_fn(model, b), b) for b in batches * 2]
        assert any(i.teleported for i in infos)
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
