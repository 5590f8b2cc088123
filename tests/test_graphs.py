"""CUDA graphs of the adapter step (``cost_fast.teleport.graphs``), on CPU: every refusal named
before any work, the eager teleport unchanged when a capture is refused or fails, and the
capture's plumbing (warm-up steps, static inputs refreshed at every replay, batches of other
shapes run eagerly, outputs copied) through a stand-in whose replay re-runs the captured step."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import cost_fast.teleport.adapter_teleport as adapter_teleport
from cost_fast.models import MultiTaskMLP, batch_task_losses
from cost_fast.teleport import TeleportConfig, teleport
from cost_fast.teleport.graphs import WARMUP, CaptureRefused, GraphedStep, refusal
from cost_fast.teleport.lora import TeleportAdapter
from cost_fast.teleport.semantics import PaperSemantics, PublicSemantics

CUDA = torch.device("cuda")  # a device object: nothing runs on it here


def problem(sizes=(8, 8, 8)):
    torch.manual_seed(0)
    model = MultiTaskMLP(6, 3, hidden=8).double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(n, 6, generator=gen).double(), (torch.rand(n, 3, generator=gen) > 0.5).double()) for n in sizes
    ]
    return model, data, data[0]


def run(model, data, current, config, semantics=None):
    adapter = TeleportAdapter(model.backbone, rank=2, generator=torch.Generator().manual_seed(2))
    result = teleport(
        model,
        adapter,
        batch_task_losses,
        data,
        current,
        ratios=torch.ones(3, dtype=torch.float64),
        semantics=semantics or PublicSemantics(),
        config=config,
        generator=torch.Generator().manual_seed(3),
    )
    return result, [p.detach().clone() for p in model.parameters()]


class StandInGraphs:
    """Capture records the step, replay re-runs it on the static inputs: the plumbing of
    ``GraphedStep`` without a GPU."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures, self.replays, self.side = fail, 0, 0, 0

    def side_stream(self):
        self.side += 1
        return warnings.catch_warnings()  # any context manager

    def capture(self, fn):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    def replay(self, captured):
        self.replays += 1
        return captured()


def test_every_refusal_is_named() -> None:
    public, batch = PublicSemantics(), (torch.zeros(2, 6), torch.zeros(2, 3))
    assert "CUDA device" in refusal(public, torch.device("cpu"), batch, parallel=False, triton_noise=True)
    assert "process group" in refusal(public, CUDA, batch, parallel=True, triton_noise=True)
    assert "arg-max" in refusal(PaperSemantics(), CUDA, batch, parallel=False, triton_noise=True)
    per_tensor = PublicSemantics(noise="per_tensor")
    assert "per-tensor" in refusal(per_tensor, CUDA, batch, parallel=False, triton_noise=True)
    assert "triton" in refusal(public, CUDA, batch, parallel=False, triton_noise=False)
    assert "on cpu" in refusal(public, CUDA, batch, parallel=False, triton_noise=True)
    assert refusal(public, CUDA, (1.0, "no tensors"), parallel=False, triton_noise=True) is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        TeleportConfig(cuda_graphs=1)


def test_on_cpu_the_teleport_warns_and_runs_as_without_graphs() -> None:
    config = TeleportConfig(lr=1e-2, rounds=2, measure_level_set=False)
    model, data, current = problem()
    plain, plain_params = run(model, data, current, config)
    model, data, current = problem()
    with pytest.warns(CaptureRefused, match="CUDA device"):
        graphed, graphed_params = run(model, data, current, dataclasses.replace(config, cuda_graphs=True))
    assert plain.graph_note is None and "CUDA device" in graphed.graph_note
    assert graphed.task_terms == plain.task_terms and graphed.sharpness_terms == plain.sharpness_terms
    assert all(torch.equal(a, b) for a, b in zip(plain_params, graphed_params))


@pytest.mark.parametrize("fail", [False, True])
def test_a_captured_step_replays_with_each_batch_and_equals_the_eager_teleport(monkeypatch, fail: bool) -> None:
    sizes = (8, 8, 8, 5)  # the last batch has other shapes: eager after the capture
    config = TeleportConfig(lr=1e-2, rounds=2, measure_level_set=False)
    model, data, current = problem(sizes)
    plain, plain_params = run(model, data, current, config)

    stand_in = StandInGraphs(fail=fail)
    monkeypatch.setattr(adapter_teleport, "refusal", lambda *args, **kwargs: None)
    monkeypatch.setattr(
        adapter_teleport,
        "GraphedStep",
        lambda step, **kwargs: GraphedStep(step, **{**kwargs, "device": torch.device("cpu"), "graphs": stand_in}),
    )
    model, data, current = problem(sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, graphed_params = run(model, data, current, dataclasses.replace(config, cuda_graphs=True))
    failures = [w for w in caught if issubclass(w.category, CaptureRefused)]
    steps = len(sizes) * 2
    assert graphed.steps == plain.steps == steps
    assert stand_in.side == WARMUP and stand_in.captures == 1
    if fail:
        assert len(failures) == 1 and "capture failed" in graphed.graph_note and stand_in.replays == 0
    else:
        assert not failures and graphed.graph_note == "captured"
        assert stand_in.replays == steps - WARMUP - 2  # after the warm-up, all but each round's 5-sample batch
    # the same teleport: the replays read the batches copied into the static inputs
    torch.testing.assert_close(torch.tensor(graphed.task_terms), torch.tensor(plain.task_terms), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.tensor(graphed.sharpness_terms), torch.tensor(plain.sharpness_terms), rtol=1e-12, atol=0
    )
    for a, b in zip(plain_params, graphed_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
