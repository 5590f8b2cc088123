"""HTR: Adam's moments after the armed step follow COST Eq. 13; betas come back; σ ≤ 0 resets;
the pending σ lives in HTR's state dict, never in the optimizer's."""

from __future__ import annotations

import copy

import pytest
import torch

from cost_fast.teleport.htr import HistoryReuse, flat_cosine, supports_htr


def adam_with_history(cls=torch.optim.Adam, steps: int = 3, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(params, lr=1e-2, betas=(0.9, 0.999), **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.0])
def test_armed_step_follows_eq_13_then_betas_return(cls, sigma: float) -> None:
    params, opt = adam_with_history(cls)
    before = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params]
    grads = [torch.randn_like(p) for p in params]
    assert HistoryReuse(opt).arm(sigma) == "modulated"
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # changed only inside the step
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    b1, b2 = 0.9 * sigma, 0.999 * sigma
    for p, g, (m, v) in zip(params, grads, before):
        torch.testing.assert_close(opt.state[p]["exp_avg"], b1 * m + (1 - b1) * g)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], b2 * v + (1 - b2) * g * g)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    # the next step is an ordinary Adam step again
    m_prev = opt.state[params[0]]["exp_avg"].clone()
    g = torch.randn_like(params[0])
    params[0].grad, params[1].grad = g, torch.zeros_like(params[1])
    opt.step()
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"], 0.9 * m_prev + 0.1 * g)


def test_pending_htr_waits_for_a_step_with_gradients_and_survives_a_state_dict() -> None:
    params, opt = adam_with_history()
    htr = HistoryReuse(opt)
    htr.arm(0.5)
    htr.arm(0.5)  # arming twice is still one modulated step
    saved_opt, saved_htr = copy.deepcopy(opt.state_dict()), htr.state_dict()
    assert saved_opt["param_groups"][0]["betas"] == (0.9, 0.999) and saved_htr == {
        "pending_sigma": 0.5,
        "last_update": None,
    }
    for p in params:
        p.grad = None
    opt.step()  # nothing to update (e.g. right after a teleport): HTR stays pending
    assert htr.pending_sigma == 0.5
    # a fresh optimizer and HTR loaded from the two state dicts apply the same modulated step
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh_opt = torch.optim.Adam(fresh, lr=1e-2)
    fresh_opt.load_state_dict(saved_opt)
    fresh_htr = HistoryReuse(fresh_opt)
    fresh_htr.load_state_dict(saved_htr)
    grads = [torch.randn_like(p) for p in params]
    for o, ps in ((opt, params), (fresh_opt, fresh)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
        assert o.param_groups[0]["betas"] == (0.9, 0.999)
    for a, b in zip(params, fresh):
        assert torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"])
    assert htr.pending_sigma is None and fresh_htr.pending_sigma is None


@pytest.mark.parametrize("sigma", [0.0, -0.4, -1.0])
def test_non_positive_sigma_starts_a_fresh_adam(sigma: float) -> None:
    params, opt = adam_with_history()
    assert HistoryReuse(opt).arm(sigma) == "reset"
    assert len(opt.state) == 0
    g = [torch.randn_like(p) for p in params]
    for p, gi in zip(params, g):
        p.grad = gi
    opt.step()
    for p, gi in zip(params, g):
        assert int(opt.state[p]["step"]) == 1
        torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * gi)


def test_bad_optimizer_and_sigma() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(p, lr=0.1)
    assert not supports_htr(sgd)
    with pytest.raises(TypeError, match="Adam or AdamW"):
        HistoryReuse(sgd)
    _, opt = adam_with_history()
    htr = HistoryReuse(opt)
    for bad in (1.5, float("nan"), -2.0):
        with pytest.raises(ValueError, match="cosine"):
            htr.arm(bad)


def test_flat_cosine() -> None:
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])]
    b = [torch.tensor([[1.0, 1.0]]), torch.tensor([0.0])]
    torch.testing.assert_close(flat_cosine(a, b), torch.tensor(2**-0.5))
    x = [torch.randn(3, 4), torch.randn(7)]
    y = [torch.randn(3, 4), torch.randn(7)]
    fx, fy = torch.cat([t.reshape(-1) for t in x]), torch.cat([t.reshape(-1) for t in y])
    torch.testing.assert_close(flat_cosine(x, y), torch.nn.functional.cosine_similarity(fx, fy, dim=0))
    assert flat_cosine([torch.zeros(3)], [torch.ones(3)]) == 0
    with pytest.raises(ValueError, match="shape mismatch"):
        flat_cosine([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(ValueError, match="equal length"):
        flat_cosine([], [])


def test_g_prime_is_kept_apart_and_travels_in_the_state() -> None:
    params, opt = adam_with_history()
    htr = HistoryReuse(opt, params=params, keeps_last_update=True)
    update = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    htr.record_update(update)
    update.zero_()  # the engine's buffer is overwritten by the next step: g' is a copy
    assert htr.last_update is not None and float(htr.last_update.sum()) > 0
    state = htr.state_dict()
    fresh = HistoryReuse(
        torch.optim.Adam([torch.nn.Parameter(p.detach().double()) for p in params]),
        params=[torch.nn.Parameter(p.detach().double()) for p in params],
        keeps_last_update=True,
    )
    assert fresh.state_problems(state) == []
    fresh.load_state_dict(state)
    assert fresh.last_update.dtype == torch.float64 and torch.equal(fresh.last_update.float(), htr.last_update)
    assert "not in (0, 1]" in fresh.state_problems({**state, "pending_sigma": 2.0})[0]
    assert "shape" in fresh.state_problems({**state, "last_update": torch.zeros(2)})[0]
    assert HistoryReuse(opt).state_dict()["last_update"] is None  # without keeps_last_update, no g'
    with pytest.raises(ValueError, match="needs the shared parameters"):
        HistoryReuse(opt, keeps_last_update=True)


def test_close_removes_the_hooks_and_the_betas_stay_as_they_are() -> None:
    params, opt = adam_with_history()
    before = (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks))
    htr = HistoryReuse(opt)
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == (before[0] + 1, before[1] + 1)
    htr.arm(0.5)
    htr.close()
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == before
    assert htr.pending_sigma is None
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # an ordinary Adam step: the closed HTR modulates nothing
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
