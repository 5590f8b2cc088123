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


@pytest.mark.parametrize("shuffle", ["no", "yes"])
def test_lightning_checkpoint_resume_in_a_fresh_process_is_bit_exact(tmp_path: Path, shuffle: str) -> None:
    full = _run(tmp_path / "full.pt", 4, "--shuffle", shuffle)
    first = _run(tmp_path / "first.pt", 2, "--save", str(tmp_path / "mid.ckpt"), "--shuffle", shuffle)
    resumed = _run(tmp_path / "resumed.pt", 4, "--resume", str(tmp_path / "mid.ckpt"), "--shuffle", shuffle)
    # the resumed epochs see the batches the uninterrupted run saw, in its order
    assert [i["batch"] for i in resumed["infos"]] == [i["batch"] for i in full["infos"][12:]]
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


class _Scheduled(lightning_worker.DigitsLike):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        every = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": every, "interval": "step"}}


class _PerEpoch(lightning_worker.DigitsLike):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)]


@pytest.mark.parametrize(("module_class", "expected"), [(_Scheduled, 1e-2 * 0.5**2), (_PerEpoch, 1e-2 * 0.1**4)])
def test_the_lr_schedulers_of_configure_optimizers_are_stepped(module_class: type, expected: float) -> None:
    data = lightning_worker.loader()
    module = module_class(data)
    trainer = lightning_worker.trainer(4)  # 24 optimizer steps, 4 epochs
    trainer.fit(module, train_dataloaders=data)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


class _ReturnsALoss(lightning_worker.DigitsLike):
    def training_step(self, batch, batch_idx):  # the usual Lightning way: it would train nothing here
        return torch.stack(list(self.task_losses(batch).values())).sum()


def test_a_training_step_that_trains_by_itself_is_refused_at_its_first_batch() -> None:
    data = lightning_worker.loader()
    module = _ReturnsALoss(data)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match="did not call COSTModule.training_step"):
        lightning_worker.trainer(1).fit(module, train_dataloaders=data)
    assert all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


class _Accumulating(lightning_worker.DigitsLike):
    def __init__(self, loader) -> None:
        super().__init__(loader)
        self.accumulate_grad_batches = 2
        self.norms: list[float] = []

    def build_cost(self, optimizer):
        from cost_fast import BaseStepConfig

        cost = COST(
            self,
            self.net.backbone,
            "fairgrad",
            optimizer,
            loss_fn=lambda model, batch: model.net.task_losses(*batch),
            teleport_data=self.loader,
            base_step=BaseStepConfig(clip_grad_norm=0.1),  # COST's clipping, for Trainer(gradient_clip_val=...)
        )
        shared = list(self.net.backbone.parameters())
        optimizer.register_step_pre_hook(
            lambda *_: self.norms.append(
                float(torch.stack([p.grad.norm() for p in shared if p.grad is not None]).norm())
            )
        )
        return cost


def test_accumulation_and_clipping_the_cost_way_and_what_is_logged() -> None:
    data = lightning_worker.loader()
    module = _Accumulating(data)
    trainer = lightning_worker.trainer(2, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 6  # 12 batches, two per optimizer step
    assert len(module.norms) == 6 and max(module.norms) <= 0.1 + 1e-6  # clipped before each step
    metrics = trainer.logged_metrics
    tally = module.cost.tally.summary()
    assert metrics["cost/teleported"] == tally["teleported"] and metrics["cost/skipped"] == tally["skipped"]
    assert {f"loss/task_{i}" for i in range(lightning_worker.NUM_TASKS)} <= set(metrics)
    assert {f"weight/task_{i}" for i in range(lightning_worker.NUM_TASKS)} <= set(metrics)
