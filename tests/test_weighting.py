"""Loss weightings against their formulas, their learning rules, bad input and state round trips."""

from __future__ import annotations

import math

import pytest
import torch

from cost_fast import get_aggregator, list_aggregators
from cost_fast.weighting import DWA, FAMO, GLS, IMTLL, RLW, STCH, UW, GradNorm, ScaleInvariant

LOSS_METHODS = sorted(name for name, kind in list_aggregators().items() if kind == "loss")
L = torch.tensor([0.5, 1.0, 2.0, 4.0])


def test_registry_has_every_loss_weighting() -> None:
    assert set(LOSS_METHODS) == {"si", "gls", "rlw", "dwa", "uw", "imtl_l", "stch", "famo", "gradnorm"}


def test_closed_form_weights() -> None:
    torch.testing.assert_close(ScaleInvariant(4).weights(L), 1 / L)
    gls = torch.exp(L.log().mean())
    torch.testing.assert_close(GLS(4)(L), gls)
    torch.testing.assert_close(GLS(4).weights(L), gls / (4 * L))
    torch.testing.assert_close(UW(4).weights(L), torch.full((4,), 0.5))
    torch.testing.assert_close(IMTLL(4).weights(L), torch.ones(4))
    # STCH without warm-up: total = K μ logsumexp(log L / μ)  ⇒  w_i = K softmax(log L/μ)_i / L_i
    mu = 0.5
    expected = 4 * torch.softmax(L.log() / mu, 0) / L
    torch.testing.assert_close(STCH(4, mu=mu).weights(L), expected)


def test_rlw_weights_are_random_softmax_and_reproducible() -> None:
    a, b = RLW(4, seed=3), RLW(4, seed=3)
    wa = a.weights(torch.ones(4))
    assert (wa > 0).all() and math.isclose(wa.sum().item(), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(wa, b.weights(torch.ones(4)))
    assert not torch.equal(wa, a.weights(torch.ones(4)))
    state = a.state_dict()
    expected = a.weights(torch.ones(4))
    c = RLW(4, seed=0)
    c.load_state_dict(state)
    torch.testing.assert_close(c.weights(torch.ones(4)), expected)


def test_dwa_uses_the_last_two_epoch_means() -> None:
    dwa = DWA(3, temperature=2.0)
    for epoch_losses in ([1.0, 1.0, 1.0], [0.5, 1.0, 2.0]):
        torch.testing.assert_close(dwa.weights(torch.ones(3)), torch.ones(3))
        dwa.update(torch.tensor(epoch_losses))
        dwa.update(torch.tensor(epoch_losses))
        dwa.end_epoch()
    ratio = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(dwa.weights(torch.ones(3)), 3 * torch.softmax(ratio / 2.0, 0))
    with pytest.raises(RuntimeError, match="no update"):
        dwa.end_epoch()
    clone = DWA(3)
    clone.load_state_dict(dwa.state_dict())
    torch.testing.assert_close(clone.weights(torch.ones(3)), dwa.weights(torch.ones(3)))


def test_uw_learns_log_losses() -> None:
    uw = UW(4)
    opt = torch.optim.SGD(uw.parameters(), lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        uw(L).backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), L.log(), atol=1e-3, rtol=0)


def test_imtl_l_learns_unit_scaled_losses() -> None:
    imtl = IMTLL(4)
    opt = torch.optim.SGD(imtl.parameters(), lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        imtl(L).backward()
        opt.step()
    torch.testing.assert_close(imtl.weights(L) * L, torch.ones(4), atol=1e-3, rtol=0)


def test_stch_warmup_then_nadir() -> None:
    stch = STCH(3, mu=1.0, warmup_steps=2)
    losses = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(stch.weights(losses), 1 / losses)  # warm-up: Σ log L
    stch.update(losses)
    stch.update(2 * losses)
    torch.testing.assert_close(stch.nadir, 1.5 * losses.double())
    # after warm-up every loss sits at 2/3 of its nadir: equal normalized losses
    y = (losses / (1.5 * losses)).log()
    expected = 3 * torch.softmax(y, 0) / losses
    torch.testing.assert_close(stch.weights(losses), expected)
    clone = STCH(3, mu=1.0, warmup_steps=2)
    clone.load_state_dict(stch.state_dict())
    torch.testing.assert_close(clone.weights(losses), expected)


def test_famo_shifts_weight_to_the_task_that_improved_less() -> None:
    famo = FAMO(2, lr=0.1)
    before = torch.tensor([1.0, 1.0])
    after = torch.tensor([0.5, 0.99])  # task 0 improved a lot, task 1 barely
    for _ in range(5):
        famo(before)
        famo.update(after)
    z = torch.softmax(famo.logits, 0)
    assert z[1] > z[0]
    # w_i = z_i / (c D_i) with c = Σ z/D
    D = before + famo.eps
    torch.testing.assert_close(famo.weights(before), z / ((z / D).sum() * D))
    clone = FAMO(2, lr=0.1)
    clone.load_state_dict(famo.state_dict())
    torch.testing.assert_close(clone.logits, famo.logits)
    with pytest.raises(RuntimeError, match="before any forward"):
        FAMO(2).update(after)


def test_gradnorm_balances_gradient_norms() -> None:
    gn = GradNorm(3, alpha=0.0, lr=0.01)
    norms = torch.tensor([1.0, 2.0, 4.0])
    for _ in range(1000):
        gn.update(torch.ones(3), norms)
    G = gn.task_weights * norms
    # equal weighted gradient norms, up to the oscillation of the sign (L1) update
    assert (G.max() - G.min()) / G.mean() < 0.05
    assert math.isclose(gn.task_weights.sum().item(), 3.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="grad_norms"):
        gn.update(torch.ones(3), torch.ones(2))


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_bad_losses_are_named(name: str) -> None:
    method = get_aggregator(name, num_tasks=3)
    with pytest.raises(ValueError, match="1-D tensor of 3"):
        method(torch.ones(2))
    with pytest.raises(ValueError, match="1-D tensor of 3"):
        method(torch.ones(3, 1))
    with pytest.raises(TypeError, match="floating"):
        method(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="1-D tensor"):
        method([1.0, 2.0, 3.0])
    if method.needs_positive_losses:
        with pytest.raises(ValueError, match="> 0"):
            method(torch.tensor([1.0, 0.0, 2.0]))


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_weights_are_finite_and_total_is_differentiable(name: str) -> None:
    method = get_aggregator(name, num_tasks=3)
    losses = torch.tensor([1e-6, 1.0, 1e6], requires_grad=True)
    method(losses).backward()
    assert torch.isfinite(losses.grad).all()
    assert torch.isfinite(method.weights(losses)).all()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: UW(0), "num_tasks"),
        (lambda: DWA(3, temperature=0), "temperature"),
        (lambda: STCH(3, mu=-1.0), "mu"),
        (lambda: STCH(3, warmup_steps=-2), "warmup_steps"),
        (lambda: FAMO(3, lr=0), "lr"),
        (lambda: FAMO(3, min_losses=torch.zeros(2)), "min_losses"),
        (lambda: GradNorm(3, alpha=-1.0), "alpha"),
    ],
)
def test_bad_hyperparameters(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
