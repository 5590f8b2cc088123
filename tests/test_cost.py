"""The COST step: base updates identical to a plain MTL step, teleports under frequency control,
HTR afterwards, delayed start, every kind of base method, bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from cost_fast import TaskGradients, get_aggregator, gram_stats
from cost_fast.cost import COST
from cost_fast.models import MultiTaskMLP, batch_task_losses
from cost_fast.teleport import TeleportConfig

K = 4


def setup(seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    u = torch.randn(8, generator=gen)
    # tasks 0/1 agree, 2/3 are their opposites: strong conflicts with the mean gradient
    y = torch.stack([x @ u > 0, x @ u > 0.3, x @ u < 0, x @ u < -0.3], dim=1).float()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = MultiTaskMLP(8, K, hidden=16)
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


def make_cost(model, batches, base="fairgrad", **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = kwargs.pop("teleport", TeleportConfig(lr=1e-2, rounds=1, guard_tolerance=1e9))
    cost = COST(
        model,
        model.backbone,
        get_aggregator(base) if isinstance(base, str) else base,
        optimizer,
        batch_task_losses,
        batches[:2],
        teleport=config,
        **kwargs,
    )
    return cost, optimizer


def test_base_steps_equal_a_plain_mtl_step() -> None:
    model, batches = setup()
    plain = copy.deepcopy(model)
    cost, _ = make_cost(model, batches, start_step=10**9)
    engine = TaskGradients(plain.backbone.parameters(), num_tasks=K)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    fairgrad = get_aggregator("fairgrad")
    for batch in batches:
        info = cost.step(batch_task_losses(model, batch), batch)
        assert not info.teleported and "solve_and_step" in info.seconds
        opt.zero_grad(set_to_none=True)
        losses = batch_task_losses(plain, batch)
        w = fairgrad(gram_stats(engine.compute(losses, retain_graph=True)).gram)
        (losses @ w).backward(inputs=list(plain.heads.parameters()))
        engine.combine(w)
        opt.step()
    ours = cost.adapter.base_parameters + list(model.heads.parameters())
    theirs = list(plain.backbone.parameters()) + list(plain.heads.parameters())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_teleport_once_per_epoch_with_htr() -> None:
    model, batches = tug_setup(1)
    cost, optimizer = make_cost(model, batches, start_step=1)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches * 2]
    assert all(i.trigger for i in infos[1:])  # once trained a little, some task opposes the mean
    tele = [i for i in infos if i.teleported or i.rolled_back]
    assert len(tele) == 1 and tele[0].step == 1  # delayed start, then frequency control
    t = tele[0]
    assert t.teleport_steps == 2 and len(t.task_terms) == 2 and t.sharpness_terms[1] >= 0
    assert t.sigma is not None and -1 <= t.sigma <= 1 and t.htr in ("modulated", "reset")
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # restored after the next step
    cost.end_epoch()
    info = cost.step(batch_task_losses(model, batches[0]), batches[0])
    assert info.teleported or info.rolled_back  # a new epoch allows a new teleport
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_paper_semantics_trigger_teleport_and_htr() -> None:
    model, batches = tug_setup(2)
    config = TeleportConfig.paper(lr=1e-2, rounds=1, guard_tolerance=1e9)
    cost, optimizer = make_cost(model, batches, semantics="paper", start_step=1, teleport=config)
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    for info in infos:
        assert info.trigger == (info.num_dominated >= 2)  # Eq. 4 with K = 4
    tele = [i for i in infos if i.teleported or i.rolled_back]
    assert len(tele) == 1 and tele[0].sigma is not None and tele[0].htr in ("modulated", "reset")
    assert tele[0].teleport_steps == 2 and tele[0].sharpness_terms[0] > 0
    with pytest.raises(ValueError, match="semantics"):
        make_cost(model, batches, semantics="paper", teleport=TeleportConfig())


@pytest.mark.parametrize("base", ["mgda", "si", "graddrop", "upgrad"])
def test_every_kind_of_base_method_trains(base: str) -> None:
    model, batches = setup(3)
    kwargs = {"num_tasks": K} if base == "si" else {}
    cost, _ = make_cost(model, batches, base=get_aggregator(base, **kwargs), start_step=10**9)
    trained = cost.adapter.base_parameters + list(model.heads.parameters())
    before = [p.detach().clone() for p in trained]
    for b in batches:
        cost.step(batch_task_losses(model, b), b)
    assert all(not torch.equal(p, q) for p, q in zip(trained, before))


def test_bad_arguments() -> None:
    model, batches = setup()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="Aggregator or a LossWeighting"):
        COST(model, model.backbone, "fairgrad", opt, batch_task_losses, batches)
    with pytest.raises(ValueError, match="semantics"):
        COST(model, model.backbone, get_aggregator("mean"), opt, batch_task_losses, batches, semantics="sometimes")
    with pytest.raises(ValueError, match="submodule"):
        COST(model, torch.nn.Linear(2, 2), get_aggregator("mean"), opt, batch_task_losses, batches)
    with pytest.raises(TypeError, match="callable"):
        COST(model, model.backbone, get_aggregator("mean"), opt, None, batches)


def test_resume_continues_like_an_uninterrupted_run() -> None:
    def run(resume_at: int | None):
        model, batches = tug_setup(4)
        cost, opt = make_cost(model, batches, start_step=2, base=get_aggregator("pcgrad", seed=1))
        infos = []
        for i, b in enumerate(batches * 2):
            if i == resume_at:  # save everything, rebuild from scratch, load
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), cost.state_dict())
                model, _ = tug_setup(99)
                cost, opt = make_cost(model, batches, start_step=2, base=get_aggregator("pcgrad", seed=1))
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                cost.load_state_dict(saved[2])
            if i == 4:
                cost.end_epoch()
            infos.append(cost.step(batch_task_losses(model, b), b))
        return [p.detach().clone() for p in cost.adapter.base_parameters], infos

    straight, straight_infos = run(None)
    resumed, resumed_infos = run(3)
    assert any(i.teleported for i in straight_infos[3:])  # the resumed part includes a teleport
    assert [(i.teleported, i.htr) for i in straight_infos] == [(i.teleported, i.htr) for i in resumed_infos]
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b)


def test_losses_must_be_a_vector() -> None:
    model, batches = setup()
    cost, _ = make_cost(model, batches)
    with pytest.raises(ValueError, match="1-D tensor"):
        cost.step(batch_task_losses(model, batches[0]).sum(), batches[0])


def test_loha_adapter_teleports() -> None:
    model, batches = tug_setup(5)
    cost, _ = make_cost(model, batches, start_step=1, adapter="loha")
    infos = [cost.step(batch_task_losses(model, b), b) for b in batches]
    tele = [i for i in infos if i.teleported or i.rolled_back]
    assert len(tele) == 1 and cost.adapter.method == "loha" and tele[0].teleport_steps == 2
