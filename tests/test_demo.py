"""The demo and the command line at tiny sizes."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cost_fast.cli import main
from cost_fast.demo import run_demo


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_demo_trains_and_reports_statistics(mode: str) -> None:
    out = io.StringIO()
    history = run_demo(steps=25, num_tasks=4, batch_size=32, mode=mode, out=out)
    assert [r.step for r in history] == list(range(25))
    for r in history:
        assert math.isfinite(r.mean_loss) and math.isfinite(r.mean_norm)
        assert 0 <= r.num_dominated <= 4 and 0 <= r.num_conflicting_pairs <= 6
        assert -1.0 <= r.min_cos_mean <= 1.0
        assert r.trigger == (r.num_dominated >= 2)
    assert sum(r.mean_loss for r in history[-5:]) < sum(r.mean_loss for r in history[:5])  # it learns
    text = out.getvalue()
    assert "K=4 tasks" in text and text.rstrip().splitlines()[-1].startswith("done: trigger fired on")


def test_demo_is_reproducible() -> None:
    assert run_demo(steps=3, seed=5) == run_demo(steps=3, seed=5)


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "2", "--tasks", "3"]) == 0
    assert "K=3 tasks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["demo", "--steps", "-1"], ["demo", "--tasks", "0"], ["demo", "--mode", "vmap"], ["demo", "--device", "nope"], []],
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
