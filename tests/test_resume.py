"""Resume in a fresh process is bit-exact, from the model's, the optimizer's and COST's state dicts
saved at any step, right after a teleport (with HTR pending) included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS = 12


def run(*args: str) -> None:
    subprocess.run([sys.executable, str(WORKER), *args], check=True, timeout=300)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run.pt"
    run(str(out), str(STEPS))
    return torch.load(out, weights_only=True)


def test_the_run_covers_both_htr_branches(straight: dict) -> None:
    outcomes = {htr for _, teleported, htr in straight["infos"] if teleported}
    assert outcomes == {"modulated", "reset"}


# 2 and 7: right after a teleport whose HTR (modulated betas) is still pending; 4: after a reset;
# 5: in the middle of an epoch.
@pytest.mark.parametrize("save_at", [2, 4, 5, 7])
def test_resumed_run_equals_the_uninterrupted_one(straight: dict, save_at: int, tmp_path: Path) -> None:
    first = tmp_path / "first.pt"
    run(str(first), str(STEPS), "--save-at", str(save_at))
    resumed = tmp_path / "resumed.pt"
    run(str(resumed), str(STEPS), "--resume", str(first) + ".ckpt")
    got = torch.load(resumed, weights_only=True)
    assert got["infos"] == straight["infos"][save_at:]
    for a, b in zip(got["params"] + got["adam"], straight["params"] + straight["adam"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got["rng"], straight["rng"])  # the user's random stream too
    saved = torch.load(str(first) + ".ckpt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # never modulated on disk
