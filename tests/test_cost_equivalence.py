"""Whole COST steps, fast engine against a plain loop built from the straightforward pieces.

The plain loop computes per-task gradients with K backward passes (``reference_task_gradients``),
M = G Gᵀ and the trigger with plain torch, teleports with ``reference_teleport`` (deep copies,
``get_peft_model``, ``merge_and_unload``), computes σ on concatenated vectors and applies HTR
by hand (σ ≤ 0: Adam's state dropped; else betas (0.9σ, 0.999σ) for one step). In float64, both
must agree on every decision, and on the parameters and Adam's moments after every step, in
both semantics.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cost_fast import get_aggregator
from cost_fast.cost import COST
from cost_fast.lora import ADAPTER
from cost_fast.reference import reference_task_gradients, reference_teleport
from cost_fast.teleport import TeleportConfig, paper_ratio_weights, reference_ratio_weights

K = 4
BETAS = (0.9, 0.999)


class Tug(torch.nn.Module):
    """A shared backbone pulled toward four targets by four tasks (some always oppose the mean),
    plus one linear head per task so that the heads' update is checked too."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(K))

    def task_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        out = torch.cat([head(h) for head in self.heads], dim=1)
        return ((out - targets) ** 2).mean(dim=0) + (h.sum(dim=1, keepdim=True) - targets).square().mean(dim=0)


def loss_fn(model, batch):
    return model.task_losses(*batch)


def problem(seed: int):
    torch.manual_seed(seed)
    model = Tug().double()
    gen = torch.Generator().manual_seed(seed + 1)
    targets = torch.tensor([1.0, -1.0, 1.5, -2.0], dtype=torch.float64)
    batches = [(torch.randn(8, 6, generator=gen, dtype=torch.float64), targets.expand(8, K)) for _ in range(5)]
    return model, batches


def plain_loop(model, batches, semantics: str, config: TeleportConfig, lora_a: list[torch.Tensor], lr: float):
    """The straightforward COST loop; yields (decision, params, optimizer) after every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    fairgrad = get_aggregator("fairgrad")
    shared = list(model.backbone.parameters())
    heads = list(model.heads.parameters())
    buffer = torch.zeros(sum(p.numel() for p in shared), K, dtype=torch.float64)
    last_update, teleported, restore_betas = None, False, False
    for step, batch in enumerate(batches):
        losses = loss_fn(model, batch)
        G = reference_task_gradients(model, shared, losses, buffer).T.clone()
        M = G @ G.T
        norms = M.diagonal().sqrt()
        g0 = G.mean(dim=0)
        cos = (G @ g0) / (norms * g0.norm())
        fires = bool(cos.min() <= 0) if semantics == "reference" else int((cos < 0).sum()) >= math.ceil(K / 2)
        if fires and step >= 1 and not teleported:
            if semantics == "paper":
                last_update = G.T @ fairgrad(M)  # g' at the pre-teleport point (Eq. 12)
            ratios = (reference_ratio_weights if semantics == "reference" else paper_ratio_weights)(norms)
            before = torch.cat([p.detach().reshape(-1) for p in shared])
            moved = reference_teleport(
                model,
                "backbone",
                loss_fn,
                batches[:2],
                batch,
                ratios,
                config,
                generator=torch.Generator().manual_seed(0),
                initial_lora_a=lora_a,
            )
            with torch.no_grad():
                for p, q in zip(shared, moved.backbone.parameters(), strict=True):
                    p.copy_(q)
            teleported = True
            delta = torch.cat([p.detach().reshape(-1) for p in shared]) - before
            sigma = float(delta @ last_update / (delta.norm() * last_update.norm()))
            if sigma <= 0:
                optimizer.state.clear()
            else:
                optimizer.param_groups[0]["betas"] = (sigma * BETAS[0], sigma * BETAS[1])
                restore_betas = True
            yield "teleport", sigma
            continue
        w = fairgrad(M)
        optimizer.zero_grad(set_to_none=True)
        (losses @ w).backward(inputs=heads)
        last_update = G.T @ w
        offset = 0
        for p in shared:
            p.grad = last_update[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        if restore_betas:
            optimizer.param_groups[0]["betas"] = BETAS
            restore_betas = False
        yield "base", optimizer


def assert_same_state(fast_model, fast_opt, plain_model, plain_opt) -> None:
    ours = [(name, p) for name, p in fast_model.named_parameters() if "lora_" not in name]
    for (name, a), b in zip(ours, plain_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12, msg=name)
        sa, sb = fast_opt.state.get(a, {}), plain_opt.state.get(b, {})
        assert sa.keys() == sb.keys(), name
        for key in ("exp_avg", "exp_avg_sq"):
            if key in sa:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-15, msg=f"{name} {key}")
    assert fast_opt.param_groups[0]["betas"] == plain_opt.param_groups[0]["betas"]


@pytest.mark.parametrize(
    ("semantics", "seed", "htr"), [("reference", 4, "reset"), ("reference", 15, "modulated"), ("paper", 4, "reset")]
)
def test_cost_steps_match_the_plain_loop(semantics: str, seed: int, htr: str) -> None:
    lr = 1e-2
    config = TeleportConfig.for_semantics(semantics, lr=lr, rounds=2, guard=False)
    if semantics == "paper":
        config.relative_radius = 1e-2
    model, batches = problem(seed)
    plain_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        optimizer,
        loss_fn,
        batches[:2],
        semantics=semantics,
        start_step=1,
        teleport=config,
    )
    lora_a = [layer.lora_A[ADAPTER].weight.detach().clone() for layer in cost.adapter.layers]
    plain = plain_loop(plain_model, batches, semantics, config, lora_a, lr)
    decisions = []
    for batch in batches:
        info = cost.step(loss_fn(model, batch), batch)
        kind, value = next(plain)
        decisions.append(kind)
        assert info.teleported == (kind == "teleport")
        if kind == "teleport":
            assert info.sigma == pytest.approx(value, rel=1e-9, abs=1e-12)
            assert info.htr == ("reset" if value <= 0 else "modulated") == htr  # the branch this case covers
        else:
            assert_same_state(model, optimizer, plain_model, value)
    # one teleport, then base steps, the first with HTR's betas and the next ones with Adam's own
    assert decisions.count("teleport") == 1 and decisions[0] == "base" and decisions[-1] == "base"
