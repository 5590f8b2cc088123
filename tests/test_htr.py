"""HTR: Adam's moments after the armed step follow COST Eq. 13; betas come back; σ ≤ 0 resets;
the pending σ lives in HTR's state dict, never in the optimizer's."""

from __future__ import annotations

import copy

import pytest
import torch

from cost_fast.htr import HistoryReuse, flat_cosine, supports_htr


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
    assert saved_opt["param_groups"][0]["betas"] == (0.9, 0.999) and saved_htr == {"pending_sigma": 0.5}
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
