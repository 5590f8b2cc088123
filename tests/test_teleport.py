"""The fast teleport against the yardstick (written from the equations); the guard for losses of any
sign; the step budget; batched perturbed evaluation."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from cost_fast.models import CelebACNN, batch_task_losses
from cost_fast.teleport import TeleportConfig, guard_verdict, level_set_error, teleport
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.perturbed import same_shapes
from cost_fast.teleport.semantics import PaperSemantics, PublicSemantics, get_semantics
from cost_fast.yardstick import YardstickCOST, yardstick_teleport

PUBLIC = PublicSemantics()
NORMS = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def perturbed_losses(model, named, loss_fn, batch, n, generator, samples_per_pass, noise="per_tensor"):
    """(n, K) losses at the public semantics' noise (ν = 1e-4), as the fast path draws it with
    ``noise`` ("per_tensor": a list per sample; "flat": one (n, P) draw)."""
    from cost_fast.kernels.tensorwise_noise import TensorwiseNoise
    from cost_fast.teleport.perturbed import flat_sample_losses, sample_losses

    params = [p for _, p in named]
    if noise == "flat":
        sizes = tuple(p.numel() for p in params)
        draw = TensorwiseNoise(sizes, n, 1e-4, generator=generator, dtype=params[0].dtype, device="cpu").draw()
        return flat_sample_losses(model, loss_fn, batch, named, draw, samples_per_pass)
    draws = [lambda: PUBLIC.per_tensor_noise(params, generator)] * n
    return sample_losses(model, loss_fn, batch, named, draws, samples_per_pass)


K = 3


def problem(seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    model = CelebACNN(num_tasks=K, width=2).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(4, 3, 16, 16, generator=gen, dtype=dtype), torch.randint(0, 2, (4, K), generator=gen))
        for _ in range(2)
    ]
    current = (
        torch.randn(4, 3, 16, 16, generator=gen, dtype=dtype),
        torch.randint(0, 2, (4, K), generator=gen),
    )
    ratios = PUBLIC.ratio_weights(NORMS)
    return model, data, current, ratios


def run_fast_and_yardstick(seed: int, semantics, config: TeleportConfig):
    """The same teleport by the fast engine (on the model, in place) and by the yardstick (on a
    copy), both drawing the adapter's factors and the noise from generators seeded alike."""
    model, data, current, _ = problem(seed)
    yardstick_input = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    adapter = TeleportAdapter(model.backbone, rank=2, generator=generator)
    ratios = semantics.ratio_weights(NORMS)
    result = teleport(
        model,
        adapter,
        batch_task_losses,
        data,
        current,
        ratios=ratios,
        semantics=semantics,
        config=config,
        lr=1e-2,
        generator=generator,
    )
    expected, yardstick_steps = yardstick_teleport(
        yardstick_input,
        "backbone",
        batch_task_losses,
        data,
        current,
        norms=NORMS,
        semantics=semantics,
        config=config,
        lr=1e-2,
        rank=2,
        generator=torch.Generator().manual_seed(7),
    )
    assert result.steps == yardstick_steps == 4 and not result.rolled_back and expected is not None
    moved = 0.0
    for ours, theirs, before, delta in zip(
        adapter.base_parameters, expected.backbone.parameters(), yardstick_input.backbone.parameters(), result.deltas
    ):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.detach(), before.detach() + delta, rtol=1e-12, atol=1e-14)
        moved += float((ours - before).detach().abs().sum())
    assert moved > 0  # the teleport did move the backbone
    return model, adapter, result, expected, current


@pytest.mark.parametrize("samples_per_pass", [1, 2, 5])
def test_fast_teleport_equals_the_yardstick(samples_per_pass: int) -> None:
    config = TeleportConfig(rounds=2, guard_tolerance=1e9, samples_per_pass=samples_per_pass)
    model, adapter, _, expected, current = run_fast_and_yardstick(0, PUBLIC, config)
    # same function after the teleport, and the adapter is detached again
    x = current[0]
    torch.testing.assert_close(model.eval()(x), expected.eval()(x), rtol=1e-9, atol=1e-12)
    assert list(model.state_dict()) == list(expected.state_dict())  # the model's own keys, nothing added


@pytest.mark.parametrize("noise", ["per_tensor", "flat"])
@pytest.mark.parametrize("semantics", ["public", "paper"])
def test_a_teleport_with_stacked_batches_equals_the_yardstick(noise: str, semantics: str) -> None:
    """stack_batches: the two forwards with grad as one vmapped pass, the same teleport."""
    chosen = PublicSemantics(noise=noise) if semantics == "public" else PaperSemantics()
    config = TeleportConfig(rounds=2, guard_tolerance=1e9, stack_batches=True)
    _, data, current, _ = problem(0)
    assert all(same_shapes(batch, current) for batch in data)  # so every step stacks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and vmap runs the loss: no fallback to two passes
        run_fast_and_yardstick(0, chosen, config)


def test_stacked_batches_run_one_pass_and_fall_back_once_for_a_loss_vmap_cannot_run() -> None:
    model, data, current, ratios = problem(1)
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return batch_task_losses(m, batch)

    def host_loss(m, batch):  # .item() inside a loss is legal, but vmap cannot trace it
        calls.append(1)
        losses = batch_task_losses(m, batch)
        return losses * (1.0 + 0.0 * losses.sum().item())

    config = TeleportConfig(lr=1e-2, rounds=1, measure_level_set=False, stack_batches=True, samples_per_pass=1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    teleport(model, adapter, counting_loss, data, current, ratios=ratios, semantics=PUBLIC, config=config)
    assert len(calls) == 2 + 2 * (5 + 1)  # contour, then per step: 5 samples and one stacked pass
    calls.clear()
    with pytest.warns(RuntimeWarning, match="stack_batches") as caught:
        teleport(model, adapter, host_loss, data, current, ratios=ratios, semantics=PUBLIC, config=config)
    assert len([w for w in caught if "stack_batches" in str(w.message)]) == 1  # said once, then two passes
    assert len(calls) == 2 + (5 + 1 + 2) + (5 + 2)  # the failed stacked try, then two plain passes


def test_guard_rolls_back_bit_exactly() -> None:
    model, data, current, ratios = problem(1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    before = adapter.snapshot()
    # an absurd step size: the teleport wrecks the losses and the guard must undo it
    config = TeleportConfig(lr=10.0, rounds=1, guard=True)  # on: public semantics has it off by default
    result = teleport(model, adapter, batch_task_losses, data, current, ratios=ratios, semantics=PUBLIC, config=config)
    assert result.rolled_back and result.rollback_reason == "loss rose"
    assert all(torch.equal(p, b) for p, b in zip(adapter.adapted_weights, before))
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
        ratios=ratios,
        semantics=PUBLIC,
        config=TeleportConfig(lr=1e-3, rounds=5, max_steps=3, guard_tolerance=1e9),
        progress=lambda step, lt, lg: seen.append((step, lt, lg)),
    )
    assert result.steps == 3 and [s for s, _, _ in seen] == [1, 2, 3]
    assert len(result.task_terms) == 3 and all(float(lg) >= 0 for _, _, lg in seen)
    assert result.sharpness_terms == [float(lg) for _, _, lg in seen]
    config = TeleportConfig(lr=1e-3)
    with pytest.raises(ValueError, match="re-iterable"):
        teleport(model, adapter, batch_task_losses, iter(data), current, ratios=ratios, semantics=PUBLIC, config=config)
    with pytest.raises(ValueError, match="no batch"):
        teleport(model, adapter, batch_task_losses, [], current, ratios=ratios, semantics=PUBLIC, config=config)
    with pytest.raises(ValueError, match="learning rate"):
        teleport(
            model, adapter, batch_task_losses, data, current, ratios=ratios, semantics=PUBLIC, config=TeleportConfig()
        )
    with pytest.raises(ValueError, match="rounds"):
        TeleportConfig(rounds=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 3


def test_public_ratio_weights() -> None:
    R = PUBLIC.ratio_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(R, torch.tensor([2 * 0.75, 2 * 0.25]))


@pytest.mark.parametrize("samples_per_pass", [1, 3])
def test_fast_paper_teleport_equals_the_yardstick(samples_per_pass: int) -> None:
    """Paper semantics: differentiating only the arg-max sample gives the yardstick's update."""
    config = TeleportConfig(rounds=2, guard_tolerance=1e9, samples_per_pass=samples_per_pass)
    _, _, result, _, _ = run_fast_and_yardstick(3, PaperSemantics(relative_radius=1e-2), config)
    assert result.sharpness_terms[0] > 0


def test_semantics_objects() -> None:
    from cost_fast.kernels.perturb import sphere_noise

    R = PaperSemantics().ratio_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(R, 2 * torch.softmax(torch.tensor([4.0, 4.0 / 3.0]), 0))
    params = [torch.randn(3, 4), torch.randn(5)]
    a, b = sphere_noise(params, 11, 0.5), sphere_noise(params, 11, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # regenerable from the seed
    norm = torch.cat([x.reshape(-1) for x in a]).norm()
    torch.testing.assert_close(norm, torch.tensor(0.5))
    assert not torch.equal(sphere_noise(params, 12, 0.5)[0], a[0])
    assert get_semantics("public") == PUBLIC and (PUBLIC.task_weight, PUBLIC.sharpness_weight) == (10.0, 0.5)
    paper = get_semantics("paper")
    assert (paper.task_weight, paper.sharpness_weight) == (1.0, 0.1)  # Eq. 11
    with pytest.raises(ValueError, match="semantics must be one of"):
        get_semantics("both")
    with pytest.raises(ValueError, match="noise_norm"):
        PublicSemantics(noise_norm=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.task_weight = 10.0


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        ([1.0, 2.0], [1.04, 2.0], None),  # +4% < 5%
        ([1.0, 2.0], [1.06, 2.0], "loss rose"),
        ([-8.0, 2.0], [-8.0, 2.0], None),  # a no-op teleport at a negative loss is kept
        ([-8.0, 2.0], [-7.7, 2.0], None),  # rose by 0.3 < 5% of |-8|
        ([-8.0, 2.0], [-7.5, 2.0], "loss rose"),  # rose by 0.5 > 0.4
        ([-8.0, 2.0], [-9.0, 2.0], None),  # fell
        ([0.0, 2.0], [0.0, 2.0], None),
        ([0.0, 2.0], [1e-3, 2.0], "loss rose"),
        ([1.0, 2.0], [float("nan"), 2.0], "non-finite"),
    ],
)
def test_guard_is_relative_to_the_size_of_the_contour(before, after, verdict) -> None:
    assert guard_verdict(torch.tensor(before), torch.tensor(after), 0.05) == verdict


def test_a_no_op_teleport_at_negative_losses_is_never_rolled_back() -> None:
    model, data, current, ratios = problem(6)

    def negative(m, batch):
        return batch_task_losses(m, batch) - 10.0

    adapter = TeleportAdapter(model.backbone, rank=2)
    config = TeleportConfig(lr=1e-30, rounds=1, guard=True)
    result = teleport(model, adapter, negative, data, current, ratios=ratios, semantics=PUBLIC, config=config)
    assert bool((result.contour_before < 0).all()) and not result.rolled_back and result.contour_after is not None


def test_the_guard_is_off_by_default_in_public_semantics_only() -> None:
    model, data, current, ratios = problem(1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    wreck = TeleportConfig(lr=10.0, rounds=1)
    public = teleport(model, adapter, batch_task_losses, data, current, ratios=ratios, semantics=PUBLIC, config=wreck)
    # measured (the level-set error) but kept, as the public code keeps it
    assert not public.rolled_back and public.level_set_error > wreck.guard_tolerance
    model, data, current, _ = problem(1)
    adapter = TeleportAdapter(model.backbone, rank=2)
    paper = PaperSemantics()
    result = teleport(
        model,
        adapter,
        batch_task_losses,
        data,
        current,
        ratios=paper.ratio_weights(NORMS),
        semantics=paper,
        config=wreck,
    )
    assert result.contour_after is not None


@pytest.mark.parametrize("noise", ["per_tensor", "flat"])
def test_batched_samples_equal_one_per_pass_and_leave_the_model_untouched(noise: str) -> None:
    model, _, current, _ = problem(4)
    named = list(model.eval().named_parameters())
    before = [p.detach().clone() for _, p in named]
    rows = {
        s: perturbed_losses(model, named, batch_task_losses, current, 5, torch.Generator().manual_seed(3), s, noise)
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


@pytest.mark.parametrize("noise", ["per_tensor", "flat"])
def test_a_loss_vmap_cannot_run_falls_back_with_a_warning(noise: str) -> None:
    model, _, current, _ = problem(5)
    named = list(model.eval().named_parameters())

    def host_loss(m, batch):  # .item() inside a loss is legal, but vmap cannot trace it
        losses = batch_task_losses(m, batch)
        return losses * (1.0 + 0.0 * losses.sum().item())

    plain = perturbed_losses(model, named, host_loss, current, 4, torch.Generator().manual_seed(3), 1, noise)
    with pytest.warns(RuntimeWarning, match="vmap"):
        batched = perturbed_losses(model, named, host_loss, current, 4, torch.Generator().manual_seed(3), 2, noise)
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
    config = TeleportConfig(lr=10.0, rounds=1, guard=False, measure_level_set=False)
    result = teleport(model, adapter, counting_loss, data, current, ratios=ratios, semantics=PUBLIC, config=config)
    assert not result.rolled_back and result.contour_after is None and result.level_set_error is None
    assert any(not torch.equal(p, b) for p, b in zip(adapter.adapted_weights, before))
    # contour (2 batches) + per step (5 samples + current + teleport batch) x 2 steps: no pass after
    assert len(calls) == 2 + 2 * 7
    # measuring the level-set error costs one pass over the teleport data (2 batches)
    calls.clear()
    adapter.restore(before)
    measured = dataclasses.replace(config, measure_level_set=True)
    result = teleport(model, adapter, counting_loss, data, current, ratios=ratios, semantics=PUBLIC, config=measured)
    assert not result.rolled_back and result.level_set_error is not None and len(calls) == 2 + 2 * 7 + 2
    with pytest.raises(ValueError, match="samples_per_pass"):
        TeleportConfig(samples_per_pass=0)


def fresh_teleport(seed: int, *, loss_fn=batch_task_losses, data=None, dtype=torch.float64, **kwargs):
    """A teleport of a fresh problem with separate generators for the factors and the noise."""
    model, default_data, current, ratios = problem(seed, dtype)
    adapter = TeleportAdapter(model.backbone, rank=2, generator=torch.Generator().manual_seed(7))
    kwargs.setdefault("semantics", PUBLIC)
    kwargs.setdefault("config", TeleportConfig(lr=1e-2, rounds=1, guard_tolerance=1e9))
    result = teleport(
        model,
        adapter,
        loss_fn,
        default_data if data is None else data,
        current,
        ratios=ratios,
        generator=torch.Generator().manual_seed(9),
        **kwargs,
    )
    return model, adapter, result


def test_a_semantics_is_taken_by_name_everywhere() -> None:
    by_object = fresh_teleport(0)[0]
    by_name = fresh_teleport(0, semantics="public")[0]
    assert all(torch.equal(a, b) for a, b in zip(by_object.parameters(), by_name.parameters()))
    model, data, current, _ = problem(0)
    config = TeleportConfig(lr=1e-2, rounds=1, guard_tolerance=1e9)
    runs = [
        yardstick_teleport(
            model,
            "backbone",
            batch_task_losses,
            data,
            current,
            norms=NORMS,
            semantics=semantics,
            config=config,
            lr=1e-2,
            rank=2,
            generator=torch.Generator().manual_seed(7),
        )[0]
        for semantics in ("public", PUBLIC)
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters()))
    from cost_fast import get_aggregator

    optimizer = torch.optim.Adam(model.parameters())
    plain = YardstickCOST(
        model,
        "backbone",
        get_aggregator("mgda"),
        optimizer,
        loss_fn=batch_task_losses,
        teleport_data=data,
        semantics="paper",
    )
    assert plain.semantics == PaperSemantics()


def test_the_adapter_runs_at_the_semantics_scale() -> None:
    _, adapter, _ = fresh_teleport(0)
    assert adapter.alpha == PUBLIC.lora_alpha == 8.0  # a default adapter at the semantics' alpha (scale 8/r)
    assert adapter.scale == 8.0 / 2
    _, adapter, _ = fresh_teleport(0, semantics=PublicSemantics(lora_alpha=2.0))
    assert adapter.alpha == 2.0 and adapter.scale == 1.0


def test_calls_with_arguments_in_the_wrong_place_say_which() -> None:
    model, data, current, ratios = problem(0)
    adapter = TeleportAdapter(model.backbone, rank=2)
    config = TeleportConfig(lr=1e-2)
    with pytest.raises(TypeError, match="positional"):  # the first release's positional call
        teleport(model, adapter, batch_task_losses, data, current, ratios, PUBLIC, config)
    with pytest.raises(TypeError, match="semantics must be a name"):
        teleport(model, adapter, batch_task_losses, data, current, ratios=ratios, semantics=config, config=config)
    with pytest.raises(TypeError, match="config must be a TeleportConfig"):
        teleport(model, adapter, batch_task_losses, data, current, ratios=ratios, semantics=PUBLIC, config=PUBLIC)
    with pytest.raises(ValueError, match="ratios must be the 1-D tensor R"):
        teleport(model, adapter, batch_task_losses, data, current, ratios=1.0, semantics=PUBLIC, config=config)
    with pytest.raises(TypeError, match="ratios"):  # the yardstick takes the norms, never R
        yardstick_teleport(
            model,
            "backbone",
            batch_task_losses,
            data,
            current,
            ratios=ratios,
            semantics=PUBLIC,
            config=config,
            lr=1e-2,
            generator=torch.Generator(),
        )
    with pytest.raises(TypeError, match="positional"):
        yardstick_teleport(
            model,
            "backbone",
            batch_task_losses,
            data,
            current,
            NORMS,
            PUBLIC,
            config,
            lr=1e-2,
            generator=torch.Generator(),
        )


def test_given_adapter_factors_are_kept_with_reset_false() -> None:
    drawn_inside = fresh_teleport(2)[0]
    model, data, current, ratios = problem(2)
    adapter = TeleportAdapter(model.backbone, rank=2, generator=torch.Generator().manual_seed(7))
    adapter.reset()  # the same factors, drawn by the caller
    factors = [p.detach().clone() for p in adapter.adapter_parameters]

    def run(model, adapter):
        return teleport(
            model,
            adapter,
            batch_task_losses,
            data,
            current,
            ratios=ratios,
            semantics=PUBLIC,
            config=TeleportConfig(lr=1e-2, rounds=1, guard_tolerance=1e9),
            generator=torch.Generator().manual_seed(9),
            reset=False,
        )

    run(model, adapter)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), drawn_inside.parameters()))
    other, _, _, _ = problem(2)
    other_adapter = TeleportAdapter(other.backbone, rank=2)
    other_adapter.set_factors([2 * f for f in factors])  # other factors: another teleport
    run(other, other_adapter)
    assert any(not torch.equal(a, b) for a, b in zip(other.parameters(), drawn_inside.parameters()))


@pytest.mark.parametrize("fault", ["nan_batch", "huge_lr"])
@pytest.mark.parametrize("semantics", ["public", "paper"])
def test_a_non_finite_teleport_is_never_merged_guard_or_not(fault: str, semantics: str) -> None:
    model, data, _, _ = problem(3, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    config = TeleportConfig(lr=1e30 if fault == "huge_lr" else 1e-2, rounds=1, guard=False)
    if fault == "nan_batch":
        x, y = data[1]
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")  # one NaN feature in one teleport batch
        data = [data[0], (x, y)]
    model, adapter, result = fresh_teleport(3, data=data, semantics=semantics, config=config, dtype=torch.float32)
    assert result.rolled_back and result.rollback_reason == "non-finite"
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(float(d.abs().sum()) == 0 for d in result.deltas)


@pytest.mark.parametrize("semantics", ["public", "paper"])
@pytest.mark.parametrize("failing_call", [1, 4, 10, 12])
def test_an_error_mid_teleport_leaves_the_weights_bit_exact(semantics: str, failing_call: int) -> None:
    """Call 1 is the contour pass; each step starts with its no-grad passes, W + ΔW (+ ε) written
    into the weights in place (public: calls 2-6 and 9-13; paper: 2-7 and 11-16), ΔW ≠ 0 from
    the second step on."""
    model, data, current, ratios = problem(7)
    adapter = TeleportAdapter(model.backbone, rank=2)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == failing_call:
            raise KeyboardInterrupt("stopped")
        return batch_task_losses(m, batch)

    config = TeleportConfig(lr=1e-2, rounds=2)
    with pytest.raises(KeyboardInterrupt):
        teleport(model, adapter, failing, data, current, ratios=ratios, semantics=semantics, config=config)
    assert len(calls) == failing_call
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- the level-set error and the loss-preserving teleport ---------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "floor", "error"),
    [
        ([2.0, -4.0], [2.1, -4.0], 1e-3, 0.05),  # relative to |L*|, for a loss of either sign
        ([2.0, -4.0], [2.0, -3.0], 1e-3, 0.25),
        ([0.0, 1.0], [0.01, 1.0], 0.1, 0.1),  # a loss at 0 is judged against the floor
        ([1.0, 1.0], [float("nan"), 1.0], 1e-3, float("inf")),
    ],
)
def test_level_set_error(before, after, floor: float, error: float) -> None:
    assert level_set_error(torch.tensor(before), torch.tensor(after), floor) == pytest.approx(error)


def test_level_set_settings_are_checked() -> None:
    for bad in ({"level_set_tolerance": -0.1}, {"level_set_tolerance": float("nan")}, {"level_set_floor": 0.0}):
        with pytest.raises(ValueError, match="level_set"):
            TeleportConfig(**bad)
    with pytest.raises(ValueError, match="level_set_halvings"):
        TeleportConfig(level_set_halvings=-1)
    with pytest.raises(ValueError, match="measure_level_set"):
        TeleportConfig(measure_level_set=1)


def plain_contour(model, data, loss_fn) -> torch.Tensor:
    """Mean task losses over the data, written out (the check does not use loss_contour)."""
    with torch.no_grad():
        return torch.stack([loss_fn(model, batch).double() for batch in data]).mean(0)


def test_a_loss_preserving_teleport_on_the_digits_stays_within_its_tolerance() -> None:
    from cost_fast.apps.demo import NUM_TASKS, digits_tasks
    from cost_fast.models import MultiTaskMLP

    x, y, _, _ = digits_tasks(0)
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 128, 64)]
    ratios = PUBLIC.ratio_weights(torch.ones(NUM_TASKS, dtype=torch.float64))
    results = {}
    # a large adapter step (lr 0.05): the whole ΔW moves some loss by over 30%
    for tolerance in (None, 0.01, 0.002):
        torch.manual_seed(0)
        model = MultiTaskMLP(64, NUM_TASKS, hidden=16)
        model.eval()
        before = plain_contour(model, data, batch_task_losses)
        weights = [p.detach().clone() for p in model.parameters()]
        adapter = TeleportAdapter(model.backbone, generator=torch.Generator().manual_seed(0))
        config = TeleportConfig(lr=0.05, rounds=2, num_samples=2, level_set_tolerance=tolerance)
        semantics = PublicSemantics(noise="per_tensor")  # the stream on which ΔW is known to be large
        result = teleport(
            model, adapter, batch_task_losses, data, data[0], ratios=ratios, semantics=semantics, config=config
        )
        after = plain_contour(model, data, batch_task_losses)
        error = float(((after - before).abs() / before.abs().clamp_min(1e-3)).max())
        if result.rolled_back:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        else:
            assert result.level_set_error == pytest.approx(error, rel=1e-6, abs=1e-12)
        results[tolerance] = result
    assert results[None].level_set_error > 0.3 and results[None].fraction == 1
    shrunk = results[0.01]
    assert not shrunk.rolled_back and shrunk.level_set_error <= 0.01 and shrunk.fraction < 1
    refused = results[0.002]
    assert refused.rollback_reason == "left the level set" and refused.level_set_error > 0.002


def test_a_loss_preserving_teleport_on_the_toy_stays_within_its_tolerance() -> None:
    from cost_fast.apps.toy import ToyModel, toy_losses

    def toy_loss(model, batch):
        return model.task_losses(batch[0])

    data = [(torch.ones(1, 1), None)]
    ratios = PUBLIC.ratio_weights(torch.ones(2, dtype=torch.float64))
    outcomes = []
    # points of public-semantics trajectories where whole teleports moved the losses by 10% to 300%
    for point in [(5.2, 2.0), (-5.0, 2.5), (0.5, -5.0), (4.5, -4.4)]:
        model = ToyModel(point)
        before = toy_losses(model.theta.double())
        adapter = TeleportAdapter(model.backbone, generator=torch.Generator().manual_seed(0))
        config = TeleportConfig(lr=0.01, rounds=20, level_set_tolerance=0.05)
        result = teleport(
            model,
            adapter,
            toy_loss,
            data,
            data[0],
            ratios=ratios,
            semantics=PUBLIC,
            config=config,
            generator=torch.Generator().manual_seed(1),
        )
        after = toy_losses(model.theta.double())
        if result.rolled_back:
            assert result.rollback_reason == "left the level set" and torch.equal(after, before)
        else:
            assert float(((after - before).abs() / before.abs().clamp_min(1e-3)).max()) <= 0.05
        outcomes.append("rolled back" if result.rolled_back else "shrunk" if result.fraction < 1 else "whole")
    assert outcomes == ["shrunk", "rolled back", "whole", "whole"]
