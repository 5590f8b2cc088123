"""The fast teleport against the straightforward reference; the guard; the step budget."""

from __future__ import annotations

import copy

import pytest
import torch

from cost_fast.lora import ADAPTER, TeleportAdapter
from cost_fast.models import CelebACNN, batch_task_losses
from cost_fast.reference import reference_teleport
from cost_fast.teleport import TeleportConfig, perturbed_losses, reference_ratio_weights, teleport

K = 3


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = CelebACNN(num_tasks=K, width=2).double()
    gen = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 2, (4, K), generator=gen))
        for _ in range(2)
    ]
    current = (
        torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64),
        torch.randint(0, 2, (4, K), generator=gen),
    )
    ratios = reference_ratio_weights(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    return model, data, current, ratios


def run_fast_and_reference(seed: int, ratios: torch.Tensor, config: TeleportConfig):
    """The same teleport by the fast engine (on the model, in place) and by the reference (on a copy)."""
    model, data, current, _ = problem(seed)
    reference_input = copy.deepcopy(model)
    adapter = TeleportAdapter(model.backbone, rank=2)
    initial_a = [layer.lora_A[ADAPTER].weight.detach().clone() for layer in adapter.layers]
    result = teleport(
        model, adapter, batch_task_losses, data, current, ratios, config, generator=torch.Generator().manual_seed(7)
    )
    expected = reference_teleport(
        reference_input,
        "backbone",
        batch_task_losses,
        data,
        current,
        ratios,
        config,
        rank=2,
        generator=torch.Generator().manual_seed(7),
        initial_lora_a=initial_a,
    )
    assert result.steps == 4 and not result.rolled_back
    moved = 0.0
    for ours, theirs, before, delta in zip(
        adapter.base_parameters, expected.backbone.parameters(), reference_input.backbone.parameters(), result.deltas
    ):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.detach(), before.detach() + delta, rtol=1e-12, atol=1e-14)
        moved += float((ours - before).detach().abs().sum())
    assert moved > 0  # the teleport did move the backbone
    return model, adapter, result, expected, current


@pytest.mark.parametrize("samples_per_pass", [1, 2, 5])
def test_fast_teleport_equals_reference(samples_per_pass: int) -> None:
    ratios = reference_ratio_weights(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    config = TeleportConfig(lr=1e-2, rounds=2, guard_tolerance=1e9, samples_per_pass=samples_per_pass)
    model, adapter, _, expected, current = run_fast_and_reference(0, ratios, config)
    # same function after the teleport, and the adapter is back to the identity, disabled
    x = current[0]
    torch.testing.assert_close(model.eval()(x), expected.eval()(x), rtol=1e-9, atol=1e-12)
    assert not adapter.enabled and all(
        torch.equal(layer.lora_B[ADAPTER].weight, torch.zeros_like(layer.lora_B[ADAPTER].weight))
        for layer in adapter.layers
    )


def test_guard_rolls_back_bit_exactly() -> None:
    model, data, current, ratios = problem(1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    before = adapter.snapshot()
    # an absurd step size: the teleport wrecks the losses and the guard must undo it
    result = teleport(model, adapter, batch_task_losses, data, current, ratios, TeleportConfig(lr=10.0, rounds=1))
    assert result.rolled_back
    assert all(torch.equal(p, b) for p, b in zip(adapter.base_parameters, before))
    assert all(float(d.abs().sum()) == 0 for d in result.deltas)
    assert model.training  # mode restored


def test_step_budget_progress_and_bad_data() -> None:
    model, data, current, ratios = problem(2)
    adapter = TeleportAdapter(model.backbone, rank=2)
    seen = []
    result = teleport(
        model,
        adapter,
        batch_task_losses,
        data,
        current,
        ratios,
        TeleportConfig(rounds=5, max_steps=3, guard_tolerance=1e9),
        progress=lambda step, lt, lg: seen.append((step, lt, lg)),
    )
    assert result.steps == 3 and [s for s, _, _ in seen] == [1, 2, 3]
    assert len(result.task_terms) == 3 and all(float(lg) >= 0 for _, _, lg in seen)
    assert result.sharpness_terms == [float(lg) for _, _, lg in seen]
    with pytest.raises(ValueError, match="re-iterable"):
        teleport(model, adapter, batch_task_losses, iter(data), current, ratios)
    with pytest.raises(ValueError, match="no batch"):
        teleport(model, adapter, batch_task_losses, [], current, ratios)
    with pytest.raises(ValueError, match="rounds"):
        TeleportConfig(rounds=0)


def test_reference_ratio_weights() -> None:
    R = reference_ratio_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(R, torch.tensor([2 * 0.75, 2 * 0.25]))


@pytest.mark.parametrize("samples_per_pass", [1, 3])
def test_fast_paper_teleport_equals_reference(samples_per_pass: int) -> None:
    """Paper semantics: differentiating only the arg-max sample gives the reference's update."""
    from cost_fast.teleport import paper_ratio_weights

    ratios = paper_ratio_weights(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    config = TeleportConfig.paper(
        lr=1e-2, rounds=2, guard_tolerance=1e9, relative_radius=1e-2, samples_per_pass=samples_per_pass
    )
    _, _, result, _, _ = run_fast_and_reference(3, ratios, config)
    assert result.sharpness_terms[0] > 0


def test_paper_helpers() -> None:
    from cost_fast.kernels.perturb import sphere_noise
    from cost_fast.teleport import paper_ratio_weights

    R = paper_ratio_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(R, 2 * torch.softmax(torch.tensor([4.0, 4.0 / 3.0]), 0))
    params = [torch.randn(3, 4), torch.randn(5)]
    a, b = sphere_noise(params, 11, 0.5), sphere_noise(params, 11, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # regenerable from the seed
    norm = torch.cat([x.reshape(-1) for x in a]).norm()
    torch.testing.assert_close(norm, torch.tensor(0.5))
    assert not torch.equal(sphere_noise(params, 12, 0.5)[0], a[0])
    with pytest.raises(ValueError, match="semantics"):
        TeleportConfig(semantics="both")


def test_batched_samples_equal_one_per_pass_and_leave_the_model_untouched() -> None:
    model, _, current, _ = problem(4)
    named = list(model.eval().named_parameters())
    before = [p.detach().clone() for _, p in named]
    rows = {
        s: perturbed_losses(model, named, batch_task_losses, current, 5, 1e-4, torch.Generator().manual_seed(3), s)
        for s in (1, 2, 5, 8)
    }
    assert rows[1].shape == (5, K)
    for s in (2, 5, 8):  # same noise draws, in the same order, whatever the chunking
        torch.testing.assert_close(rows[s], rows[1], rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))
    # the samples differ from each other and from the unperturbed losses, by about ν's effect
    with torch.no_grad():
        base = batch_task_losses(model, current)
    assert (rows[1] - base).abs().max() > 0 and (rows[1][0] - rows[1][1]).abs().max() > 0


def test_a_loss_vmap_cannot_run_falls_back_with_a_warning() -> None:
    model, _, current, _ = problem(5)
    named = list(model.eval().named_parameters())

    def host_loss(m, batch):  # .item() inside a loss is legal, but vmap cannot trace it
        losses = batch_task_losses(m, batch)
        return losses * (1.0 + 0.0 * losses.sum().item())

    plain = perturbed_losses(model, named, host_loss, current, 4, 1e-4, torch.Generator().manual_seed(3), 1)
    with pytest.warns(RuntimeWarning, match="vmap"):
        batched = perturbed_losses(model, named, host_loss, current, 4, 1e-4, torch.Generator().manual_seed(3), 2)
    torch.testing.assert_close(batched, plain, rtol=0, atol=0)


def test_guard_off_skips_the_check() -> None:
    model, data, current, ratios = problem(1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    before = adapter.snapshot()
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return batch_task_losses(m, batch)

    # the absurd step size the guard undoes above is kept with the guard off
    result = teleport(
        model, adapter, counting_loss, data, current, ratios, TeleportConfig(lr=10.0, rounds=1, guard=False)
    )
    assert not result.rolled_back and result.contour_after is None
    assert any(not torch.equal(p, b) for p, b in zip(adapter.base_parameters, before))
    # contour (2 batches) + per step (5 samples + current + teleport batch) x 2 steps: no guard pass
    assert len(calls) == 2 + 2 * 7
    with pytest.raises(ValueError, match="samples_per_pass"):
        TeleportConfig(samples_per_pass=0)
