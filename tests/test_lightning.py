"""COST inside PyTorch Lightning (cost_fast.lightning): teleports under Lightning's loop, a resume
from Lightning's checkpoint in a fresh process, mixed precision, refusals before any batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("COST_FAST_CHECKOUT"):  # the README's test command installs the extra: never skipped there
    import lightning  # noqa: F401
else:
    pytest.importorskip("lightning")

import lightning_worker  # noqa: E402

from cost_fast import COST  # noqa: E402

WORKER = Path(__file__).with_name("lightning_worker.py")


def _run(out: Path, epochs: int, *options: str) -> dict:
    subprocess.run([sys.executable, str(WORKER), str(out), str(epochs), *options], check=True, timeout=300)
    return torch.load(out, weights_only=False)


def test_lightning_checkpoint_resume_in_a_fresh_process_is_bit_exact(tmp_path: Path) -> None:
    full = _run(tmp_path / "full.pt", 4)
    first = _run(tmp_path / "first.pt", 2, "--save", str(tmp_path / "mid.ckpt"))
    resumed = _run(tmp_path / "resumed.pt", 4, "--resume", str(tmp_path / "mid.ckpt"))
    teleports = [i["step"] for i in full["infos"] if i["teleported"]]
    after = [i["step"] for i in resumed["infos"] if i["teleported"]]
    # the run teleports, before and after the checkpoint, and HTR acts on a resumed teleport
    assert any(s < 12 for s in teleports) and after and after == [s for s in teleports if s >= 12]
    assert [i["step"] for i in first["infos"] + resumed["infos"]] == list(range(24))
    assert full["global_step"] == resumed["global_step"] == 24  # Lightning counts every batch
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])
    assert full["cost"]["checksum"] == resumed["cost"]["checksum"]
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["infos"][0]["task_names"] == tuple(f"task_{i}" for i in range(lightning_worker.NUM_TASKS))


def test_bf16_mixed_losses_with_cost_outside_autocast() -> None:
    data = lightning_worker.loader()
    module = lightning_worker.DigitsLike(data)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = lightning_worker.trainer(1, precision="bf16-mixed")  # training_step runs in bf16 autocast
    trainer.fit(module, train_dataloaders=data)
    assert len(module.infos) == len(data) and all(i["skipped"] is None for i in module.infos)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


class _OtherOptimizer(lightning_worker.DigitsLike):
    def build_cost(self, optimizer: torch.optim.Optimizer) -> COST:
        return super().build_cost(torch.optim.Adam(self.parameters(), lr=1e-2))  # not Lightning's optimizer


class _NotACost(lightning_worker.DigitsLike):
    def build_cost(self, optimizer: torch.optim.Optimizer) -> object:
        return optimizer


@pytest.mark.parametrize(
    ("module_class", "error", "match"),
    [(_OtherOptimizer, ValueError, "over the optimizer it is given"), (_NotACost, TypeError, "must return a COST")],
)
def test_a_wrong_build_cost_is_refused_before_any_batch(module_class: type, error: type, match: str) -> None:
    data = lightning_worker.loader()
    module = module_class(data)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(error, match=match):
        lightning_worker.trainer(1).fit(module, train_dataloaders=data)
    assert module.infos == [] and all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
