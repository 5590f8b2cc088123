"""Whole COST steps, fast engine against ``YardstickCOST`` (the straightforward loop, written from
the equations).

``YardstickCOST`` computes per-task gradients with K backward passes, M = G Gᵀ and the trigger in
plain torch, teleports with ``yardstick_teleport`` (deep copies, ``get_peft_model``,
``merge_and_unload``), computes σ on concatenated vectors and applies HTR by hand (σ ≤ 0: Adam's
state dropped; else betas (0.9σ, 0.999σ) for one step). In float64, both must agree on every
decision, and on the parameters and Adam's moments after every step, in both semantics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tug import Tug, tug_batches

from cost_fast import COST, PaperSemantics, PublicSemantics, TeleportConfig, TeleportSchedule, get_aggregator
from cost_fast.models import batch_task_losses
from cost_fast.yardstick import YardstickCOST


def problem(seed: int):
    torch.manual_seed(seed)
    model = Tug().double()
    return model, tug_batches(seed + 1, 5, torch.float64)


def assert_same_state(fast_model, fast_opt, plain_model, plain_opt) -> None:
    for (name, a), b in zip(fast_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12, msg=name)
        sa, sb = fast_opt.state.get(a, {}), plain_opt.state.get(b, {})
        assert sa.keys() == sb.keys(), name
        for key in ("exp_avg", "exp_avg_sq"):
            if key in sa:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-9, atol=1e-15, msg=f"{name} {key}")
    assert fast_opt.param_groups[0]["betas"] == plain_opt.param_groups[0]["betas"]


@pytest.mark.parametrize(
    ("semantics", "seed", "htr"),
    [("public", 4, "reset"), ("public", 15, "modulated"), ("paper", 4, "reset"), ("public-dominated", 9, "modulated")],
)
def test_cost_steps_match_the_yardstick(semantics: str, seed: int, htr: str) -> None:
    lr = 1e-2
    config = TeleportConfig(rounds=2, guard=False)
    semantics = {
        "paper": PaperSemantics(relative_radius=1e-2),
        "public": PublicSemantics(),
        "public-dominated": PublicSemantics(trigger="dominated"),  # Eq. 3's trigger (Table 7)
    }[semantics]
    model, batches = problem(seed)
    plain_model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cost = COST(
        model,
        model.backbone,
        get_aggregator("fairgrad"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        semantics=semantics,
        schedule=TeleportSchedule(start_step=1, steps_per_epoch=100),
        teleport=config,
    )
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=lr)
    plain = YardstickCOST(
        plain_model,
        "backbone",
        get_aggregator("fairgrad"),
        plain_opt,
        loss_fn=batch_task_losses,
        teleport_data=batches[:2],
        semantics=semantics,
        start_step=1,
        teleport=config,
    )
    teleports = 0
    for step, batch in enumerate(batches):
        info = cost.step(batch_task_losses(model, batch), batch)
        expected = plain.step(batch_task_losses(plain_model, batch), batch)
        assert info.teleported == expected["teleported"]
        if info.teleported:
            teleports += 1
            assert step > 0 and info.sigma == pytest.approx(expected["sigma"], rel=1e-9, abs=1e-12)
            assert info.htr == ("reset" if expected["sigma"] <= 0 else "modulated") == htr  # the branch covered
        else:
            assert_same_state(model, optimizer, plain_model, plain_opt)
    # one teleport, then base steps: the first with HTR's betas, the next ones with Adam's own
    assert teleports == 1 and not info.teleported
