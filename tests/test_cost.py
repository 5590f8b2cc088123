"""The COST step: base updates identical to each method's own training loop (every registered
name), teleports under frequency control with HTR, one policy for non-finite values (every
registered name), checkpoints with the plain model's keys, frozen layers untouched, torch's global
generator untouched, the backward-style API under autocast, bad arguments."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from cost_fast import COST, TaskGradients, TeleportConfig, get_aggregator, gram_stats, list_aggregators
from cost_fast.aggregators.base import GradientAggregator
from cost_fast.models import MultiTaskMLP, batch_task_losses

K = 4


def setup(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen, dtype=dtype)
    u = torch.randn(8, generator=gen, dtype=dtype)
    # tasks 0/1 agree, 2/3 are their opposites: strong conflicts with the mean gradient
    y = torch.stack([x @ u > 0, x @ u > 0.3, x @ u < 0, x @ u < -0.3], dim=1).to(dtype)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = MultiTaskMLP(8, K, hidden=16).to(dtype)
    return model, batches


class TugOfWar(torch.nn.Module):
    """One shared output pulled toward K different targets: some task always opposes the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.heads = torch.nn.ModuleList()

    def task_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        targets = torch.tensor([1.0, -1.0, 1.5, -2.0])
        return ((self.backbone(x) - targets) ** 2).mean(dim=0)


def tug_setup(seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 8, generator=gen), torch.zeros(16, K)) for _ in range(4)]
    return TugOfWar(), batches


def make_method(name: str):
    kind = list_aggregators()[name]
    return get_aggregator(name, num_tasks=K) if kind == "loss" else get_aggregator(name)


def make_cost(model, batches, base="fairgrad", *, extra_params=(), **kwargs):
    base = make_method(base) if isinstance(base, str) else base
    params = list(model.parameters()) + (list(base.parameters()) if isinstance(base, torch.nn.Module) else [])
    optimizer = torch.optim.Adam(params + list(extra_params), lr=1e-2)
    kwargs.setdefault("teleport", TeleportConfig(rounds=1, guard_tolerance=1e9))
    kwargs.setdefault("teleport_data", batches[:2])
    kwargs.setdefault("steps_per_epoch", len(batches))
    cost = COST(model, model.backbone, base, optimizer, loss_fn=batch_task_losses, **kwargs)
    return cost, optimizer


# -- every base method under COST as alone ---------------------------------------------------


def own_training_loop(name: str, model, batches, epochs: int):
    """The method's own loop, written from its documented API (no COST)."""
    method = make_method(name)
    kind = list_aggregators()[name]
    params = list(model.parameters()) + (list(method.parameters()) if kind == "loss" else [])
    opt = torch.optim.Adam(params, lr=1e-2)
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    engine = TaskGradients(shared, num_tasks=K)
    trajectory = []
    for _ in range(epochs):
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            losses = batch_task_losses(model, batch)
            if kind == "gram":
                w = method.weights(gram_stats(engine.compute(losses, retain_graph=True)).gram)
                (losses @ w.to(losses)).backward(inputs=heads)
                engine.combine(w)
            elif kind == "grads":
                d = method.aggregate(engine.compute(losses, retain_graph=True))
                losses.sum().backward(inputs=heads)
                engine.write_update(d.to(engine.grads.dtype))
            else:
                norms = torch.stack(
                    [
                        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]).norm()
                        for loss in losses
                    ]
                )
                method(losses).backward()
            opt.step()
            if name in ("dwa", "stch"):
                method.update(losses)
            elif name == "famo":
                with torch.no_grad():
                    method.update(batch_task_losses(model, batch))
            elif name == "gradnorm":
                method.update(losses, norms)
            trajectory.append([p.detach().clone() for p in model.parameters()])
        if name == "dwa":
            method.end_epoch()
    return trajectory, method


@pytest.mark.parametrize("name", sorted(list_aggregators()))
def test_every_method_under_cost_without_teleports_equals_its_own_loop(name: str) -> None:
    epochs = 3  # DWA changes its weights from the third epoch on
    model, batches = setup(3, torch.float64)
    alone = copy.deepcopy(model)
    cost, _ = make_cost(model, batches, name, max_teleports_per_epoch=0, teleport_data=batches)
    trajectory = []
    for _ in range(epochs):
        for batch in batches:
            info = cost.step(batch_task_losses(model, batch), batch)
            assert info.skipped is None and not info.attempted_teleport
            trajectory.append([p.detach().clone() for p in model.parameters()])
    expected, method = own_training_loop(name, alone, batches, epochs)
    for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name}, step {step}")
    assert cost.epoch == epochs
    assert_same_state(cost.base.state_dict(), method.state_dict(), name)
    if name in ("uw", "imtl_l"):  # learned parameters did learn
        assert any(float(p.detach().abs().sum()) > 0 for p in cost.base.parameters())


def assert_same_state(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where


# -- one policy for non-finite values --------------------------------------------------------


def poisoned(kind: str):
    """A loss_fn whose losses (kind "losses") or whose first head's gradient alone (kind "head",
    via 0·sqrt(0): value 0, gradient NaN) are not finite."""

    def loss_fn(model, batch):
        losses = batch_task_losses(model, batch)
        if kind == "losses":
            return losses * torch.tensor([1.0, float("nan"), 1.0, 1.0])
        w = model.heads[0].weight
        return losses + torch.stack([0 * (w - w.detach()).abs().sqrt().sum(), *[losses[0] * 0] * (K - 1)])

    return loss_fn


@pytest.mark.parametrize("kind", ["losses", "head"])
@pytest.mark.parametrize("name", sorted(list_aggregators()))
def test_a_non_finite_step_changes_nothing_for_every_method(name: str, kind: str) -> None:
    model, batches = setup(5)
    cost, opt = make_cost(model, batches, name, max_teleports_per_epoch=0, teleport_data=batches)
    for batch in batches[:2]:  # some history first: optimizer moments, method state
        cost.step(batch_task_losses(model, batch), batch)
    before = (
        copy.deepcopy(list(model.state_dict().values())),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(cost.base.state_dict()),
    )
    batch = batches[2]
    info = cost.step(poisoned(kind)(model, batch), batch)
    assert info.skipped is not None and ("non-finite" in info.skipped)
    after = (list(model.state_dict().values()), opt.state_dict(), cost.base.state_dict())
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b), f"{name}: a parameter changed"
    assert_same_state(before[1], after[1], f"{name} optimizer")
    assert_same_state(before[2], after[2], f"{name} method state")
    assert all(p.grad is None for p in model.parameters())
    # the next finite step trains as usual
    info = cost.step(batch_task_losses(model, batch), batch)
    assert info.skipped is None


def test_nonfinite_raise_option() -> None:
    model, batches = setup(6)
    cost, _ = make_cost(model, batches, "mgda", nonfinite="raise", max_teleports_per_epoch=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        cost.step(poisoned("losses")(model, batches[0]), batches[0])
    with pytest.raises(FloatingPointError, match="head gradients"):
        cost.step(poisoned("head")(model, batches[0]), batches[0])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert cost.step_count == 0
    with pytest.raises(ValueError, match="nonfinite"):
        make_cost(model, batches, nonfinite="ignore")


class OverflowingGradientMethod(GradientAggregator):
    """A gradient method whose update overflows from finite gradients at its second call."""

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        d = G.float().sum(dim=0)
        return d * float("inf") if self.calls == 2 else d

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_gradient_methods_non_finite_update_leaves_parameters_and_optimizer(policy: str) -> None:
    model, batches = setup(7)
    cost, opt = make_cost(model, batches, OverflowingGradientMethod(), max_teleports_per_epoch=0, nonfinite=policy)
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    params, moments = copy.deepcopy(list(model.state_dict().values())), copy.deepcopy(opt.state_dict())
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="the parameters and the optimizer were not changed"):
            cost.step(batch_task_losses(model, batches[1]), batches[1])
    else:
        info = cost.step(batch_task_losses(model, batches[1]), batches[1])
        assert info.skipped is not None and "gradient method" in info.skipped
    assert all(torch.equal(a, b) for a, b in zip(params, model.state_dict().values(), strict=True))
    assert_same_state(moments, opt.state_dict(), "optimizer")
    assert all(p.grad is None for p in model.parameters())
    assert cost.base.calls == 2  # its state has taken the step, as documented
    info = cost.step(batch_task_losses(model, batches[2]), batches[2])
    assert info.skipped is None and all(torch.isfinite(p).all() for p in model.parameters())


# -- teleports, HTR, epochs ------------------------------------------------------------------


def test_teleport_once_per_epoch_with_htr() -> None:
    model, batches = tug_setup(1)
    cost, optimizer = make_cost(model, batches, start_step=1)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert all(i.trigger for i in infos[1:])  # once trained a little, some task opposes the mean
    tele = [i for i in infos if i.attempted_teleport]
    assert len(tele) == 1 and tele[0].step == 1  # delayed start, then frequency control
    t = tele[0]
    assert t.teleport_steps == 2 and len(t.task_terms) == 2 and t.sharpness_terms[1] >= 0
    assert t.sigma is not None and -1 <= t.sigma <= 1 and t.htr in ("modulated", "reset")
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert cost.epoch == 1  # 4 steps per epoch, counted by COST
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert info.attempted_teleport  # a new epoch allows a new teleport
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_paper_semantics_trigger_teleport_and_htr() -> None:
    from cost_fast import PaperSemantics

    model, batches = tug_setup(2)
    cost, _ = make_cost(model, batches, semantics=PaperSemantics(relative_radius=1e-2), start_step=1)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    for info in infos:
        assert info.trigger == (info.num_dominated >= 2)  # Eq. 4 with K = 4
    tele = [i for i in infos if i.attempted_teleport]
    assert len(tele) == 1 and tele[0].sigma is not None and tele[0].htr in ("modulated", "reset")
    assert tele[0].teleport_steps == 2 and tele[0].sharpness_terms[0] > 0


def test_paper_g_prime_does_not_advance_a_stateful_method() -> None:
    model, batches = tug_setup(2)
    base = get_aggregator("pcgrad", seed=3)
    cost, _ = make_cost(model, batches, base, semantics="paper", start_step=1)
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    state = copy.deepcopy(base.state_dict())
    info = cost.step(batch_task_losses(model, batches[1]), batches[1])
    assert info.attempted_teleport and info.sigma is not None
    assert torch.equal(base.state_dict()["rng_state"], state["rng_state"])


def test_epochs_without_a_length_need_end_epoch() -> None:
    model, batches = tug_setup(3)

    class Reiterable:  # teleport data without a length
        def __iter__(self):
            return iter(batches[:2])

    cost, _ = make_cost(model, batches, teleport_data=Reiterable(), steps_per_epoch=None, start_step=1)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    assert sum(i.attempted_teleport for i in infos) == 1 and cost.epoch == 0
    cost.end_epoch()
    assert cost.epoch == 1
    counted, _ = make_cost(*tug_setup(3))
    with pytest.raises(RuntimeError, match="counts epochs itself"):
        counted.end_epoch()


# -- checkpoints, frozen layers, global generator ----------------------------------------------


def test_checkpoints_keep_the_plain_models_keys_and_cost_state_loads_weights_only() -> None:
    model, batches = tug_setup(4)
    keys = list(TugOfWar().state_dict())
    cost, _ = make_cost(model, batches, get_aggregator("pcgrad", seed=1), start_step=1)
    assert list(model.state_dict()) == keys
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert any(i.teleported for i in infos)
    assert list(model.state_dict()) == keys
    fresh = TugOfWar()
    fresh.load_state_dict(model.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(cost.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other, _ = make_cost(fresh, batches, get_aggregator("pcgrad", seed=1), start_step=1)
    other.load_state_dict(state)
    assert other.step_count == cost.step_count and other.epoch == cost.epoch


def test_frozen_layers_never_change_and_a_frozen_backbone_is_refused() -> None:
    model, batches = tug_setup(5)
    model.backbone[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model.backbone[0].parameters()]
    cost, _ = make_cost(model, batches, start_step=1, steps_per_epoch=1)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert sum(i.teleported for i in infos) >= 2
    assert all(torch.equal(p, f) for p, f in zip(model.backbone[0].parameters(), frozen))
    model.backbone.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the shared backbone is frozen"):
        make_cost(model, batches)


def test_cost_leaves_the_global_generator_alone() -> None:
    model, batches = tug_setup(6)
    cost, _ = make_cost(model, batches, start_step=1)
    state = torch.get_rng_state()
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    assert any(i.attempted_teleport for i in infos)
    assert torch.equal(torch.get_rng_state(), state)


# -- drop-in API -----------------------------------------------------------------------------


def test_backward_leaves_the_step_to_the_caller_under_autocast() -> None:
    model, batches = tug_setup(7)

    def loss_fn(m, batch):  # mixed precision, as a user's script would write it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batch_task_losses(m, batch).float()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        optimizer,
        loss_fn=loss_fn,
        teleport_data=batches[:2],
        steps_per_epoch=4,
        start_step=2,
        teleport=TeleportConfig(rounds=1, guard=False),
    )
    first = float(loss_fn(model, batches[0]).sum().detach())
    infos = []
    for _ in range(3):
        for batch in batches:
            optimizer.zero_grad()  # backward() adds into .grad, as torch's does
            info = cost.backward(loss_fn(model, batch), batch)
            infos.append(info)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the caller's own step
            optimizer.step()
            assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert any(i.htr == "modulated" for i in infos) or any(i.htr == "reset" for i in infos)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(loss_fn(model, batches[0]).sum().detach()) < first
    assert cost.htr.pending_sigma is None  # a pending HTR was applied by the caller's step


def test_bad_arguments() -> None:
    model, batches = setup()
    opt = torch.optim.Adam(model.parameters())
    fairgrad = get_aggregator("fairgrad")
    kw = {"loss_fn": batch_task_losses, "teleport_data": batches}
    with pytest.raises(TypeError, match="base must be an Aggregator, a LossWeighting, a method's name"):
        COST(model, model.backbone, 42, opt, **kw)
    with pytest.raises(ValueError, match="unknown aggregator 'fairgrade'"):
        COST(model, model.backbone, "fairgrade", opt, **kw)
    with pytest.raises(ValueError, match="semantics"):
        COST(model, model.backbone, fairgrad, opt, semantics="sometimes", **kw)
    with pytest.raises(ValueError, match="now called 'public'"):
        COST(model, model.backbone, fairgrad, opt, semantics="reference", **kw)
    with pytest.raises(ValueError, match="submodule"):
        COST(model, torch.nn.Linear(2, 2), fairgrad, opt, **kw)
    with pytest.raises(TypeError, match="callable"):
        COST(model, model.backbone, fairgrad, opt, loss_fn=None, teleport_data=batches)
    with pytest.raises(TypeError, match="positional"):
        COST(model, model.backbone, fairgrad, opt, batch_task_losses, batches)
    with pytest.raises(ValueError, match="re-iterable"):
        COST(model, model.backbone, fairgrad, opt, loss_fn=batch_task_losses, teleport_data=iter(batches))
    with pytest.raises(ValueError, match="not in the optimizer"):
        COST(model, model.backbone, get_aggregator("uw", num_tasks=K), opt, **kw)
    with pytest.raises(ValueError, match="no trainable Linear or Conv"):
        odd = torch.nn.Module()
        odd.backbone = torch.nn.Sequential(torch.nn.LayerNorm(3))
        COST(odd, odd.backbone, fairgrad, torch.optim.Adam(odd.parameters()), **kw)
    cost, opt = make_cost(model, batches)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="1-D tensor"):
        cost.step(batch_task_losses(model, batches[0]).sum(), batches[0])
    cost.step(batch_task_losses(model, batches[0]), batches[0])
    with pytest.raises(ValueError, match="4 task losses"):
        cost.step(batch_task_losses(model, batches[0])[:3], batches[0])
    assert cost.step_count == 1 and any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_loha_adapter_teleports() -> None:
    model, batches = tug_setup(5)
    cost, _ = make_cost(model, batches, start_step=1, adapter="loha")
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    tele = [i for i in infos if i.attempted_teleport]
    assert len(tele) == 1 and cost.adapter.method == "loha" and tele[0].teleport_steps == 2


def test_fairgrad_at_alpha_1_and_nash_mtl_train_identically() -> None:
    # M w = w^(-1/α) at α = 1 is Nash-MTL's M w = 1/w: the methods table says they are one method
    runs = []
    for method in (get_aggregator("fairgrad", alpha=1.0), get_aggregator("nash_mtl")):
        model, batches = tug_setup(3)
        cost, _ = make_cost(model, batches, method, teleport=TeleportConfig(lr=1e-2, rounds=1))
        infos = [cost.step(batch_task_losses(model, b), b) for _ in range(3) for b in batches]
        runs.append((model.state_dict(), [i.teleported for i in infos]))
    (first, teleported), (second, teleported_again) = runs
    assert any(teleported) and teleported == teleported_again
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_step_info_reports_the_level_set_error_of_the_teleport() -> None:
    model, batches = tug_setup(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)  # the base step moves nothing
    cost = COST(
        model,
        model.backbone,
        get_aggregator("mean"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        teleport=TeleportConfig(lr=0.05, rounds=2),
    )

    def contour() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([batch_task_losses(model, b).double() for b in batches[:2]]).mean(0)

    for batch in batches * 3:  # Adam at lr 0 moves nothing: only a teleport changes the model
        before = contour()
        info = cost.step(batch_task_losses(model, batch), batch)
        if info.attempted_teleport:
            break
    assert info.teleported and info.merged_fraction == 1
    expected = float(((contour() - before).abs() / before.abs().clamp_min(1e-3)).max())
    assert expected > 0 and info.level_set_error == pytest.approx(expected, rel=1e-5)
