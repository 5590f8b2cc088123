"""The demo (README's main job) and the command line at small sizes."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cost_fast.cli import main
from cost_fast.demo import run_demo


def test_demo_trains_with_cost_and_reports_teleports() -> None:
    out = io.StringIO()
    history = run_demo(out=out)  # the default run: 4 epochs x 10 steps, FairGrad + COST
    assert [r.step for r in history] == list(range(40))
    for r in history:
        assert math.isfinite(r.mean_loss) and -1.0 <= r.min_cos_mean <= 1.0
        assert 0 <= r.num_dominated <= 6 and 0 <= r.num_conflicting_pairs <= 15
        assert r.trigger == (r.min_cos_mean <= 0)  # the reference trigger rule
        assert not (r.teleported and r.step < 10)  # delayed start: not in the first epoch
    per_epoch = [sum(r.teleported or r.rolled_back for r in history if r.epoch == e) for e in range(4)]
    assert max(per_epoch) <= 1 and sum(per_epoch) >= 1  # frequency control, and COST did act
    assert sum(r.mean_loss for r in history[-5:]) < sum(r.mean_loss for r in history[:5])  # it learns
    text = out.getvalue()
    assert "fairgrad + COST" in text and "teleport:" in text and "L_t" in text and "L_g" in text
    assert text.rstrip().splitlines()[-1].startswith("done in")


def test_demo_without_cost_never_teleports() -> None:
    history = run_demo(epochs=2, use_cost=False, method="mgda")
    assert not any(r.teleported or r.rolled_back for r in history)


def test_demo_is_reproducible() -> None:
    assert run_demo(epochs=2, seed=5) == run_demo(epochs=2, seed=5)


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1", "--steps-per-epoch", "3", "--tasks", "3", "--method", "mgda"]) == 0
    assert "mgda + COST, K=3 tasks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--epochs", "-1"],
        ["demo", "--tasks", "0"],
        ["demo", "--mode", "vmap"],
        ["demo", "--device", "nope"],
        ["demo", "--method", "nope"],
        ["demo", "--method", "moco"],
        [],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
