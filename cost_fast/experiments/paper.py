"""The COST paper's three experiments (Sec. 5, App. B; FairGrad's setup), each with its data, its
model, its metrics, its single-task baselines and its recipe: the options ``cost-fast train``
starts from.

    cityscapes  2 tasks (7-class segmentation, depth), 128x256, SegNet-MTAN; Adam 1e-4 halved
                every 100 epochs, 200 epochs, batch 8. Metrics: mIoU, pixel accuracy, depth
                absolute and relative error. Reported: the mean of the last 10 epochs' test
                metrics (the public trainers' "Final Performance").
    nyuv2       3 tasks (13-class segmentation, depth, normals), 288x384; the same model and
                schedule, batch 2; adds the normals' mean and median angle and the share within
                11.25°, 22.5°, 30°.
    celeba      40 binary attributes, 64x64, the 9-layer CNN with linear heads
                (``cost_fast.models.CelebACNN``); Adam 3e-4, 15 epochs, batch 256. Metric: each
                attribute's F1 (and accuracy). Reported: the test metrics of the epoch with the
                best mean validation F1 (FAMO's trainer).

COST in every recipe: FairGrad with alpha = 2 (the public ``run.sh``; the paper's text says
alpha = 1), the public code's base step, teleports from epoch ``lora_epoch`` = 50 for the dense
tasks (0 for CelebA, the public parser's default: its CelebA trainer is not published), at most
one per epoch, two passes over the training data (``tele_round``), n = 5, LoRA rank 5. The
CityScapes trainer takes a base step at the teleported point in the same iteration, the NYUv2
one does not (``BaseStepConfig.step_after_teleport``).

The single-task baselines of Δm% are the "Independent" rows of the paper's Tables 1 and 2
(``baselines.json``, with its source); the paper gives none for CelebA (its Table 3 reports only
MR and Δm%): give your own with ``--baselines``.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cost_fast.experiments import celeba_data, dense_data
from cost_fast.experiments.segnet import SegNet, SegNetMTAN
from cost_fast.experiments.synthetic import SyntheticCelebA, SyntheticDense
from cost_fast.metrics import AttributeMetrics
from cost_fast.models import CelebACNN

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

_COST_RECIPE = {
    "method": "fairgrad",
    "method_args": {"alpha": 2.0},
    "teleports_per_epoch": 1,
    "teleport_rounds": 2,
    "teleport_samples": 5,
}


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in lists and tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(item, device) for item in batch)
    return batch


def shipped_baselines() -> dict[str, Any]:
    """The contents of ``baselines.json`` (module docstring)."""
    return json.loads(resources.files("cost_fast.experiments").joinpath("baselines.json").read_text())


class Experiment(abc.ABC):
    """One experiment (module docstring). ``recipe`` maps option names of ``cost-fast train``
    to the paper's values; ``report`` is "last_10" or "best_val"."""

    name: str
    recipe: Mapping[str, Any]
    report: str

    @abc.abstractmethod
    def task_names(self) -> tuple[str, ...]:
        """The tasks, in the order of the model's losses."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, bool]:
        """The metrics Δm% and MR are taken over: name → higher is better."""

    @abc.abstractmethod
    def check_data(self, root: str | os.PathLike) -> None:
        """Check the data folder (ValueError with one line naming what is wrong and where)."""

    @abc.abstractmethod
    def splits(self, config: Mapping[str, Any]) -> dict[str, Dataset]:
        """The "train" and "test" splits (and "val" where the recipe selects on it), real or
        synthetic."""

    @abc.abstractmethod
    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        """The model: ``backbone``, ``heads``, ``task_losses(x, targets)``."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """The metrics over a split (in eval mode, without gradients), with the mean task
        losses as ``loss/<task>``."""

    def baselines(self) -> dict[str, float] | None:
        """The shipped single-task values of ``metrics()``, or None."""
        values = shipped_baselines()["experiments"].get(self.name)
        return None if values is None else {k: float(v) for k, v in values.items()}


class DenseExperiment(Experiment):
    """CityScapes or NYUv2 (module docstring)."""

    report = "last_10"

    def __init__(self, layout: dense_data.DenseLayout, batch_size: int) -> None:
        self.layout = layout
        self.name = layout.name
        self.recipe = {
            **_COST_RECIPE,
            "epochs": 200,
            "batch_size": batch_size,
            "lr": 1e-4,
            "lr_halving_epoch": 100,
            "cost_start_epoch": 50,
            "model": "mtan",
            "width": 64,
            "augment": True,
        }

    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.layout.tasks)

    def metrics(self) -> dict[str, bool]:
        higher = {
            "miou": True,
            "pixel_accuracy": True,
            "abs_err": False,
            "rel_err": False,
            "mean_angle": False,
            "median_angle": False,
            "within_11.25": True,
            "within_22.5": True,
            "within_30": True,
        }
        kinds = {
            "segmentation": ("miou", "pixel_accuracy"),
            "depth": ("abs_err", "rel_err"),
            "normal": ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"),
        }
        return {f"{t.name}/{m}": higher[m] for t in self.layout.tasks for m in kinds[t.kind]}

    def check_data(self, root: str | os.PathLike) -> None:
        for split in dense_data.SPLITS:
            dense_data.check_split(root, self.layout, split)

    def splits(self, config: Mapping[str, Any]) -> dict[str, Dataset]:
        seed = config["seed"]
        if config["synthetic"]:
            train = SyntheticDense(self.layout, config["samples"], seed=seed)
            return {"train": train, "test": SyntheticDense(self.layout, max(1, config["samples"] // 2), seed=seed + 1)}
        root = config["data"]
        return {
            "train": dense_data.DenseDataset(root, self.layout, "train", augment=config["augment"], seed=seed),
            "test": dense_data.DenseDataset(root, self.layout, "val"),  # the papers test on val
        }

    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        model = SegNetMTAN if config["model"] == "mtan" else SegNet
        return model(self.layout.tasks, width=config["width"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        metrics = [task.metrics() for task in self.layout.tasks]
        loss_sum, batches = torch.zeros(len(self.layout.tasks), device=device), 0
        for batch in loader:
            x, targets = to_device(batch, device)
            predictions = model(x)
            for metric, prediction, target in zip(metrics, predictions, targets):
                metric.update(prediction, target)
            loss_sum += torch.stack([t.loss(p, y) for t, p, y in zip(self.layout.tasks, predictions, targets)])
            batches += 1
        result = {}
        for task, metric in zip(self.layout.tasks, metrics):
            result.update({f"{task.name}/{k}": v for k, v in metric.compute().items()})
        for task, loss in zip(self.layout.tasks, (loss_sum / max(batches, 1)).tolist()):
            result[f"loss/{task.name}"] = loss
        return result


class CelebAExperiment(Experiment):
    """CelebA (module docstring)."""

    name = "celeba"
    report = "best_val"
    recipe = {
        **_COST_RECIPE,
        "epochs": 15,
        "batch_size": 256,
        "lr": 3e-4,
        "lr_halving_epoch": 0,
        "cost_start_epoch": 0,
        "width": 64,
    }

    def task_names(self) -> tuple[str, ...]:
        return tuple(CELEBA_ATTRIBUTES)

    def metrics(self) -> dict[str, bool]:
        return {f"f1/{name}": True for name in CELEBA_ATTRIBUTES}

    def check_data(self, root: str | os.PathLike) -> None:
        _, names, *_ = celeba_data.check_folder(root)
        if list(names) != CELEBA_ATTRIBUTES:
            raise ValueError(f"{root}: list_attr_celeba.txt names other attributes than CelebA's 40 ({names[:3]}...)")

    def splits(self, config: Mapping[str, Any]) -> dict[str, Dataset]:
        seed = config["seed"]
        if config["synthetic"]:
            half = max(1, config["samples"] // 2)
            train = SyntheticCelebA(config["samples"], seed=seed)
            return {
                "train": train,
                "val": SyntheticCelebA(half, seed=seed + 1),
                "test": SyntheticCelebA(half, seed=seed + 2),
            }
        return celeba_data.CelebADataset.splits(config["data"])

    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        return CelebACNN(num_tasks=len(CELEBA_ATTRIBUTES), width=config["width"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        metric = AttributeMetrics(len(CELEBA_ATTRIBUTES))
        loss_sum, batches = torch.zeros(len(CELEBA_ATTRIBUTES), device=device), 0
        for batch in loader:
            x, y = to_device(batch, device)
            logits = model(x)
            metric.update(logits, y)
            loss_sum += nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(0)
            batches += 1
        computed = metric.compute()
        result: dict[str, float] = {"mean_f1": computed["mean_f1"], "mean_accuracy": computed["mean_accuracy"]}
        for name, f1, accuracy in zip(CELEBA_ATTRIBUTES, computed["f1"], computed["accuracy"]):
            result[f"f1/{name}"] = f1
            result[f"accuracy/{name}"] = accuracy
        for name, loss in zip(CELEBA_ATTRIBUTES, (loss_sum / max(batches, 1)).tolist()):
            result[f"loss/{name}"] = loss
        return result


EXPERIMENTS: dict[str, Experiment] = {
    "cityscapes": DenseExperiment(dense_data.CITYSCAPES, batch_size=8),
    "nyuv2": DenseExperiment(dense_data.NYUV2, batch_size=2),
    "celeba": CelebAExperiment(),
}
