"""A COSTModule trained by Lightning, for tests/test_lightning.py (run as a script so that a
resume happens in a fresh process).

    python lightning_worker.py OUT EPOCHS [--save CKPT] [--resume CKPT] [--shuffle yes]

trains from a fixed initialization to EPOCHS epochs (from CKPT's epoch with --resume), then
writes OUT (torch.save): the parameters, the optimizer's state, COST's state and every step's
StepInfo fields and batch of this process; --save writes a Lightning checkpoint at the end;
--shuffle yes shuffles the training loader (from torch's global generator).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cost_fast import COST
from cost_fast.lightning import COSTModule
from cost_fast.models import MultiTaskMLP, conflicting_binary_tasks

NUM_TASKS = 6


class DigitsLike(COSTModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = MultiTaskMLP(8, num_tasks=NUM_TASKS, hidden=8)
        self.loader = loader
        self.infos: list[dict[str, Any]] = []

    def task_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return {f"task_{i}": loss for i, loss in enumerate(self.net.task_losses(x, y))}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def build_cost(self, optimizer: torch.optim.Optimizer) -> COST:
        return COST(
            self,
            self.net.backbone,
            "fairgrad",
            optimizer,
            loss_fn=lambda model, batch: model.net.task_losses(*batch),
            teleport_data=self.loader,
            scaler=self.grad_scaler,
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        info = self.last_step_info
        self.infos.append(
            {
                "step": info.step,
                "teleported": info.teleported,
                "skipped": info.skipped,
                "task_names": info.task_names,
                "htr": info.htr,
                "batch": batch[0].sum().item(),
            }
        )


def loader(shuffle: bool = False) -> DataLoader:
    x, y = conflicting_binary_tasks(96, in_features=8, num_tasks=NUM_TASKS, seed=1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle)


def trainer(epochs: int, precision: str = "32-true", **options: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **options,
    )


def main(argv: list[str]) -> None:
    out, epochs = argv[0], int(argv[1])
    options = dict(zip(argv[2::2], argv[3::2]))
    data = loader(options.get("--shuffle") == "yes")
    module = DigitsLike(data)
    run = trainer(epochs)
    run.fit(module, train_dataloaders=data, ckpt_path=options.get("--resume"))
    if "--save" in options:
        run.save_checkpoint(options["--save"])
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "optimizer": run.optimizers[0].state_dict(),
            "cost": module.cost.state_dict(),
            "global_step": run.global_step,
            "infos": module.infos,
        },
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
