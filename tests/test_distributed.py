"""Data-parallel COST on torch.distributed (gloo, 2 and 3 processes on CPU) against one process on
the whole batch: the same decisions (teleports, HTR) and the same parameters (float64: 1e-10;
float32: 1e-5) for a Gram method (FairGrad), a stateful one (PCGrad), a loss weighting (UW), the
paper semantics with its guard, uneven batches; a rank with NaN losses makes every rank skip the
step; COST's state is the same on every world size, so a checkpoint resumes on any of them; ranks
built differently get the same error on every rank, at once; no warning from COST's calls (the
worker turns warnings into errors)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")


def run(tmp: Path, world: int, method: str, *options: str, name: str | None = None) -> list[dict]:
    out = tmp / (name or f"{method}-{world}-{'-'.join(options) or 'plain'}")
    subprocess.run([sys.executable, str(WORKER), str(out), str(world), method, *options], check=True, timeout=600)
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]


def assert_same_run(ranks: list[dict], reference: dict, tolerance: float, *, teleports: bool = True) -> None:
    assert any(teleported for _, teleported, _, _ in reference["infos"]) == teleports
    for state in ranks:
        assert state["infos"] == reference["infos"]  # the same decisions on every rank
        for a, b in zip(state["params"] + state["adam"], reference["params"] + reference["adam"], strict=True):
            torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("method", "world", "options"),
    [
        ("fairgrad", 2, ()),
        ("fairgrad", 3, ()),
        ("pcgrad", 3, ()),
        ("uw", 2, ()),
        ("fairgrad", 3, ("--semantics", "paper")),
        ("fairgrad", 3, ("--uneven",)),
        ("fairgrad", 2, ("--float32",)),
        ("fairgrad", 3, ("--no-teleport",)),  # the base method alone
        ("pcgrad", 2, ("--no-teleport",)),
        ("uw", 3, ("--no-teleport",)),
    ],
)
def test_data_parallel_equals_one_process(tmp_path: Path, method: str, world: int, options: tuple[str, ...]) -> None:
    ranks = run(tmp_path, world, method, *options)
    reference = run(tmp_path, 1, method, *[o for o in options if o != "--uneven"])[0]
    tolerance = 1e-5 if "--float32" in options else 1e-10
    assert_same_run(ranks, reference, tolerance, teleports="--no-teleport" not in options)
    for key in ("clock", "semantics"):  # resumable on any world size
        assert all(state["cost"][key] == reference["cost"][key] for state in ranks)
    generator = reference["cost"]["teleporter"]["generator"]
    assert all(torch.equal(state["cost"]["teleporter"]["generator"], generator) for state in ranks)


def test_a_rank_with_nan_losses_makes_every_rank_skip_the_step(tmp_path: Path) -> None:
    ranks = run(tmp_path, 2, "fairgrad", "--nan-rank", "1", "--nan-step", "2")
    reference = run(tmp_path, 1, "fairgrad", "--nan-rank", "0", "--nan-step", "2")[0]
    assert reference["infos"][2][3].startswith("non-finite")
    assert_same_run(ranks, reference, 1e-10)


def test_a_checkpoint_from_rank_0_resumes_on_another_world_size(tmp_path: Path) -> None:
    run(tmp_path, 2, "pcgrad", "--save-at", "3", name="first")  # rank 0 writes it before step 3
    resumed = run(tmp_path, 3, "pcgrad", "--resume", str(tmp_path / "first.ckpt"), name="resumed")
    reference = run(tmp_path, 1, "pcgrad")[0]
    for state in resumed:
        assert state["infos"] == reference["infos"][3:]
        for a, b in zip(state["params"] + state["adam"], reference["params"] + reference["adam"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("mismatch", "named"),
    [
        ("lr", "optimizer"),
        ("semantics", "semantics"),
        ("seed", "seed"),
        ("init", "the parameters' values"),
        ("method", "base method"),
    ],
)
def test_ranks_built_differently_get_the_same_error_at_once(tmp_path: Path, mismatch: str, named: str) -> None:
    start = time.monotonic()
    out = tmp_path / mismatch
    command = [sys.executable, str(WORKER), str(out), "2", "fairgrad", "--mismatch", mismatch]
    subprocess.run(command, check=True, timeout=120)
    assert time.monotonic() - start < 60  # no rank waits for a collective the other never joins
    errors = [Path(f"{out}.rank{r}.error").read_text(encoding="utf-8") for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith("the ranks of the process group do not agree on")
    assert named in errors[0] and "rank 1" in errors[0]


@pytest.mark.parametrize(("loaded", "named"), [("cost", "state"), ("weights", "the parameters' values")])
def test_a_load_on_one_rank_only_is_refused_on_every_rank_at_the_next_step(tmp_path: Path, loaded, named) -> None:
    """A COST state (or model weights) loaded on rank 0 only: at the next step every rank raises
    the same error naming what differs, at once, instead of hanging in mismatched collectives or
    training apart."""
    start = time.monotonic()
    out = tmp_path / loaded
    command = [sys.executable, str(WORKER), str(out), "2", "fairgrad", "--rank0-loads", loaded]
    subprocess.run(command, check=True, timeout=120)
    assert time.monotonic() - start < 60
    errors = [Path(f"{out}.rank{r}.error").read_text(encoding="utf-8") for r in range(2)]
    assert errors[0] == errors[1] and errors[0].startswith("the ranks of the process group do not agree on")
    assert named in errors[0] and "rank 1" in errors[0]
