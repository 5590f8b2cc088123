"""COST in the loops people really write: gradient accumulation, an AMP GradScaler, autocast, a
shuffled DataLoader as teleport data, bad teleport data, skipped steps, checks before any work,
checkpoints that are validated before they load, and a start-up that does not import peft."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from tug import K, Tug, tug_batches

from cost_fast import COST, BaseStepConfig, TeleportConfig, checkpoint, get_aggregator, list_aggregators
from cost_fast.models import batch_task_losses

METHODS = sorted(list_aggregators())


def make_method(name: str):
    return get_aggregator(name, num_tasks=K) if list_aggregators()[name] == "loss" else get_aggregator(name)


def build(name: str = "fairgrad", *, seed: int = 0, dtype=torch.float64, optimizer=torch.optim.Adam, **kwargs):
    """A Tug model, its batches, its method, an optimizer over both and COST (teleports off
    unless asked)."""
    torch.manual_seed(seed)
    model = Tug().to(dtype)
    batches = tug_batches(seed, 4, dtype)
    method = make_method(name) if isinstance(name, str) else name
    params = list(model.parameters()) + (list(method.parameters()) if isinstance(method, torch.nn.Module) else [])
    opt = optimizer(params, lr=1e-2)
    kwargs.setdefault("max_teleports_per_epoch", 0)
    kwargs.setdefault("teleport_data", batches[:2])
    kwargs.setdefault("steps_per_epoch", 4)
    kwargs.setdefault("teleport", TeleportConfig(rounds=1))
    kwargs.setdefault("loss_fn", batch_task_losses)
    cost = COST(model, model.backbone, method, opt, **kwargs)
    return model, batches, cost, opt


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
        "mgda", max_teleports_per_epoch=2, start_step=4, steps_per_epoch=100, loss_fn=tug_of_war
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
        build("fairgrad", scaler=scaler, nonfinite="raise")
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
        start_step=1,
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
        start_step=1,
        steps_per_epoch=4,
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
    model, batches, cost, opt = build("mgda", max_teleports_per_epoch=1, start_step=100)

    def poisoned(m, batch):  # finite losses, the first head's gradient NaN (0·sqrt(0))
        w = m.heads[0].weight
        nan_gradient = 0 * (w - w.detach()).abs().sqrt().sum()
        return batch_task_losses(m, batch) + torch.stack([nan_gradient, *[nan_gradient.detach()] * (K - 1)])

    assert cost.step(poisoned(model, batches[0]), batches[0]).skipped is not None
    assert cost.state_dict()["last_update"] is None  # a first step that is skipped leaves none
    cost.step(batch_task_losses(model, batches[1]), batches[1])
    last = cost.state_dict()["last_update"]
    assert last is not None and torch.isfinite(last).all()
    assert cost.step(poisoned(model, batches[2]), batches[2]).skipped is not None
    assert torch.equal(cost.state_dict()["last_update"], last)


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
        build("fairgrad", optimizer=torch.optim.SGD, max_teleports_per_epoch=1)


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


def test_the_public_codes_clipping_applies_to_the_callers_optimizer_step_too() -> None:
    """``BaseStepConfig.public_code()`` clips the shared parameters' gradient to norm 1 right
    before the optimizer step (its ``clip_grad_norm_(shared, 1.0)``), heads unclipped."""
    model, batches, cost, opt = build("mgda", base_step=BaseStepConfig.public_code())
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]))
    opt.zero_grad()
    cost.backward(batch_task_losses(model, batches[0]), batches[0])
    unclipped = [p.grad.clone() for p in model.parameters()]
    opt.step()
    shared = len(list(model.backbone.parameters()))
    norm = torch.stack([g.norm() for g in seen[0][:shared]]).norm()
    assert torch.stack([g.norm() for g in unclipped[:shared]]).norm() > 1  # the clip binds
    torch.testing.assert_close(norm, torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)  # torch's eps
    assert all(torch.equal(a, b) for a, b in zip(seen[0][shared:], unclipped[shared:]))  # heads as they were


# -- 8. checkpoints --------------------------------------------------------------------------


def test_a_state_that_does_not_fit_is_refused_whole() -> None:
    model, batches, cost, opt = build("moco", max_teleports_per_epoch=1, start_step=100)
    for batch in batches[:2]:
        cost.step(batch_task_losses(model, batch), batch)
    good = cost.state_dict()
    other_method = build("pcgrad")[2].state_dict()
    bigger = Tug().double()
    bigger.backbone[0] = torch.nn.Linear(6, 9).double()
    bigger.backbone[2] = torch.nn.Linear(9, 3).double()
    wider = COST(
        bigger,
        bigger.backbone,
        get_aggregator("moco"),
        torch.optim.Adam(bigger.parameters()),
        loss_fn=batch_task_losses,
        teleport_data=batches,
    )
    cases = {  # each with its checksum, as another COST would have written it
        "base method 'PCGrad'": stamped({**good, "method": "PCGrad", "base": other_method["base"]}),
        "step_count must be an int": stamped({**good, "step_count": "3"}),
        "3 tasks, this COST 4": stamped({**good, "num_tasks": 3}),
        "not a COST state": {k: v for k, v in good.items() if k != "generator"},
        "generator state": stamped({**good, "generator": torch.zeros(3)}),
        "refuses": stamped({**good, "base": {"tracked": None}}),
        "damaged": {**good, "step_count": good["step_count"] + 1},  # a changed byte, checksum as it was
    }
    for expected, state in cases.items():
        target_model, target_batches, target, _ = build("moco", seed=1, max_teleports_per_epoch=1, start_step=100)
        target.step(batch_task_losses(target_model, target_batches[0]), target_batches[0])
        snapshot = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=expected):
            target.load_state_dict(state)
        after = target.state_dict()
        assert after.keys() == snapshot.keys()
        for key in snapshot:  # nothing was loaded
            a, b = snapshot[key], after[key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else repr(a) == repr(b), key
    with pytest.raises(ValueError, match="shared parameters, this backbone"):
        wider.load_state_dict(good)


def stamped(state: dict) -> dict:
    return {**state, "checksum": checkpoint.checksum(state)}


def test_a_flipped_byte_in_a_saved_state_is_caught(tmp_path) -> None:
    model, batches, cost, opt = build("moco", max_teleports_per_epoch=1, start_step=100)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"cost": cost.state_dict()})
    data = bytearray(path.read_bytes())
    last = cost.state_dict()["last_update"]
    offset = bytes(data).find(last.numpy().tobytes()[:16])  # inside the tensor's stored bytes
    assert offset > 0
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    _, _, fresh, _ = build("moco", max_teleports_per_epoch=1, start_step=100)
    with pytest.raises(ValueError, match="damaged"):
        fresh.load_state_dict(checkpoint.load(path)["cost"])
    assert fresh.step_count == 0


def test_checkpoint_files_are_written_whole_and_read_with_one_error(tmp_path) -> None:
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an object it cannot write
        checkpoint.save(path, {"step": 2, "bad": lambda: None})
    assert checkpoint.load(path) == {"step": 1}  # the earlier file is whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind
    whole = path.read_bytes()
    cases = {"truncated": whole[: len(whole) // 2], "empty": b"", "not a checkpoint": b"plain text\n"}
    for name, content in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot load the checkpoint {path}") as refused:
            checkpoint.load(path)
        assert "\n" not in str(refused.value), name  # one line
    with pytest.raises(ValueError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a dict"):
        checkpoint.load(path)


def test_a_state_of_the_first_format_still_loads() -> None:
    model, batches, cost, opt = build("mgda")
    state = cost.state_dict()
    first = {
        "semantics": state["semantics"],
        "step_count": 3,
        "epoch": 0,
        "teleports_this_epoch": 0,
        "has_update": False,
        "generator": state["generator"],
        "base": {},
        "last_update": torch.empty(5),  # uninitialized in that format when has_update is False
        "htr": {"pending_sigma": None},
    }
    cost.load_state_dict(first)
    assert cost.step_count == 3 and cost.state_dict()["last_update"] is None


# -- 9. start-up -----------------------------------------------------------------------------


def test_the_fast_path_never_imports_peft() -> None:
    """Importing peft takes seconds (it imports transformers): only the yardstick uses it."""
    script = """
import sys, torch
from tug import Tug, tug_batches
from cost_fast import COST, TaskGradients, get_aggregator, gram_stats
from cost_fast.models import batch_task_losses
torch.manual_seed(0)  # an initialization on which the trigger fires
model, batches = Tug(), tug_batches(0, 2)
engine = TaskGradients(model.backbone.parameters(), num_tasks=4)
gram_stats(engine.compute(batch_task_losses(model, batches[0])))
def cost(**kwargs):
    return COST(model, model.backbone, get_aggregator("fairgrad"), torch.optim.Adam(model.parameters()),
                loss_fn=batch_task_losses, teleport_data=batches, **kwargs)
without = cost(max_teleports_per_epoch=0)
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


def test_a_state_is_made_only_from_exactly_the_fields_of_its_format() -> None:
    model, batches, cost, _ = build("moco", max_teleports_per_epoch=1, start_step=100)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    state = cost.state_dict()
    assert set(state) == checkpoint.KEYS[checkpoint.FORMAT] and state["format"] == checkpoint.FORMAT
    assert state["checksum"] == checkpoint.checksum(state)
    fields = {k: v for k, v in state.items() if k not in ("format", "checksum")}
    assert checkpoint.make_state(**fields)["checksum"] == state["checksum"]
    with pytest.raises(TypeError, match="exactly the fields"):
        checkpoint.make_state(**{k: v for k, v in fields.items() if k != "epoch"})
    with pytest.raises(TypeError, match="exactly the fields"):
        checkpoint.make_state(**fields, extra=1)
