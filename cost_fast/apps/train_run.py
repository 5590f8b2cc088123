"""One ``cost-fast train`` run in memory: its model, optimizer, learning-rate schedule, COST and
loaders built from a configuration, one training epoch, the evaluation, and the state a
checkpoint keeps (``TrainingRun``). ``cost_fast.apps.train`` drives it epoch by epoch and writes
the run folder; the experiments benchmark (``bench/test_bench_train.py``) times its epochs.

Random streams: the model's initial weights from ``seed`` (the caller's global generator is
left as it was); the training order and the teleport data's order from generators reseeded at
every epoch from (seed, epoch) (``epoch_seed``); the dense augmentation per sample
(``cost_fast.experiments.dense_data``); COST's own generator in its state. So an epoch depends
only on the state at its start, which the checkpoint holds: a resumed run goes on exactly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cost_fast.apps import signals
from cost_fast.cost import COST
from cost_fast.experiments.paper import Experiment, to_device
from cost_fast.methods import Method, get_aggregator, list_aggregators
from cost_fast.step import BaseStepConfig
from cost_fast.teleport.config import AdapterConfig, RescaleConfig, TeleportConfig
from cost_fast.teleport.schedule import TeleportSchedule
from cost_fast.teleport.semantics import SEMANTICS

STATE_FORMAT = "cost-fast train state 1"


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one random stream (0: the training order, 1: the teleport data's) in one epoch."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def build_method(config: Mapping[str, Any], num_tasks: int) -> Method:
    """The base method ``config["method"]`` with ``config["method_args"]`` (a loss weighting
    also with ``num_tasks``); ValueError naming the option for an unknown method or
    hyper-parameter, or one the method refuses."""
    name = config["method"]
    kinds = list_aggregators()
    if name not in kinds:
        raise ValueError(f"--method: unknown method {name!r}; choose from {', '.join(kinds)}")
    args = dict(config["method_args"])
    if kinds[name] == "loss":
        args.setdefault("num_tasks", num_tasks)
    try:
        return get_aggregator(name, **args)
    except TypeError as err:
        raise ValueError(f"--method-arg: {name} does not take these hyper-parameters ({err})") from None


def build_cost(
    config: Mapping[str, Any],
    experiment: Experiment,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    teleport_loader: DataLoader,
    device: torch.device,
) -> COST:
    """COST over ``model``'s backbone as ``config`` says: the schedule (``cost_start_epoch``,
    ``teleports_per_epoch``, none without ``cost``), the teleport (``teleport_*``), the adapter
    (LoRA/LoHa of ``rank`` on the model's ``lora_targets``, or the rescaling teleport), the
    public code's base step or the method's own, HTR, the semantics and its trigger. Its
    teleport data is ``teleport_loader``; its loss function moves each batch to ``device``."""
    if config["adapter"] == "rescale":
        adapter: AdapterConfig | RescaleConfig = RescaleConfig()
    else:
        adapter = AdapterConfig(config["adapter"], config["rank"], targets=getattr(model, "lora_targets", None))
    if config["base_step"] == "public":
        base_step = BaseStepConfig.public_code(step_after_teleport=experiment.name == "cityscapes")
    else:
        base_step = BaseStepConfig()
    return COST(
        model,
        model.backbone,
        build_method(config, len(experiment.task_names())),
        optimizer,
        loss_fn=lambda m, batch: m.task_losses(*to_device(batch, device)),
        teleport_data=teleport_loader,
        semantics=SEMANTICS[config["semantics"]](trigger=config["trigger"]),
        schedule=TeleportSchedule(
            start_epoch=config["cost_start_epoch"], max_per_epoch=config["teleports_per_epoch"] if config["cost"] else 0
        ),
        teleport=TeleportConfig(
            lr=config["teleport_lr"],
            rounds=config["teleport_rounds"],
            max_steps=config["teleport_steps"],
            num_samples=config["teleport_samples"],
            measure_level_set=False,  # a whole pass over the training data per teleport: the public code has none
        ),
        adapter=adapter,
        base_step=base_step,
        htr=config["htr"],
        seed=config["seed"],
    )


def _loader(dataset, config: Mapping[str, Any], generator: torch.Generator | None, device: torch.device) -> DataLoader:
    """A loader of ``dataset`` in batches of ``batch_size``, shuffled by ``generator`` (None:
    in order)."""
    return DataLoader(
        dataset,
        batch_size=config["batch_size"],
        shuffle=generator is not None,
        generator=generator,
        num_workers=config["workers"],
        pin_memory=device.type == "cuda",
    )


class Progress:
    """A progress bar per epoch (tqdm when installed and ``enabled``), and one line at each
    epoch's end on ``stream``."""

    def __init__(self, stream: TextIO | None, enabled: bool) -> None:
        self.stream, self.bar = stream, None
        if enabled:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                enabled = False
        self.enabled = enabled

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        """A new bar for ``epoch`` (1-based) of ``epochs``, ``steps`` long."""
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", file=self.stream, leave=True)

    def update(self, losses: list[float], teleports: int) -> None:
        """One step done: the mean losses so far (the first four) and the teleports."""
        if self.bar is not None:
            self.bar.set_postfix_str(
                " ".join(f"{x:.3g}" for x in losses[:4]) + f" teleports {teleports}", refresh=False
            )
            self.bar.update(1)

    def end(self, line: str) -> None:
        """Close the bar and print the epoch's line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(line, file=self.stream, flush=True)


class TrainingRun:
    """A run's training objects (module docstring), built from a checked configuration.

    Args:
        config: the run's configuration (``cost_fast.apps.train_options``, checked).
        experiment: its experiment. splits: its data splits (``Experiment.splits``).
        device: where the model trains.
    """

    def __init__(
        self, config: Mapping[str, Any], experiment: Experiment, splits: Mapping[str, Dataset], device: torch.device
    ) -> None:
        self.config, self.experiment, self.splits, self.device = config, experiment, splits, device
        with torch.random.fork_rng(devices=[]):  # the model's initial weights; the caller's stream is untouched
            torch.manual_seed(config["seed"])
            model = experiment.build_model(config)
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config["lr"])
        halving = config["lr_halving_epoch"]
        self.scheduler = (
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=halving, gamma=0.5) if halving else None
        )
        self.order, self.teleport_order = torch.Generator(), torch.Generator()
        self.train_loader = _loader(splits["train"], config, self.order, device)
        teleport_loader = _loader(splits["train"], config, self.teleport_order, device)
        self.eval_loaders = {
            name: _loader(splits[name], config, None, device) for name in ("val", "test") if name in splits
        }
        self.cost = build_cost(config, experiment, self.model, self.optimizer, teleport_loader, device)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run's objects."""
        return {
            "format": STATE_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "cost": self.cost.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s (COST checks its part before anything is loaded)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError("not a cost-fast train checkpoint")
        self.cost.load_state_dict(state["cost"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def train_epoch(self, epoch: int, progress: Progress) -> dict[str, Any]:
        """Epoch ``epoch`` (0-based) of training and the learning-rate schedule; the epoch's
        row without its evaluation (``cost_fast.apps.train_report``)."""
        seed = self.config["seed"]
        self.order.manual_seed(epoch_seed(seed, epoch, 0))
        self.teleport_order.manual_seed(epoch_seed(seed, epoch, 1))
        if hasattr(self.splits["train"], "set_epoch"):
            self.splits["train"].set_epoch(epoch)
        row = _train_epoch(self, progress, epoch)
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        return row

    def evaluate(self) -> dict[str, dict[str, float]]:
        """The metrics of each evaluated split ("test", and "val" where there is one)."""
        self.model.eval()
        try:
            return {
                name: self.experiment.evaluate(self.model, loader, self.device)
                for name, loader in self.eval_loaders.items()
            }
        finally:
            self.model.train()


def _train_epoch(run: TrainingRun, progress: Progress, epoch: int) -> dict[str, Any]:
    """One pass over the training split: ``cost.step`` per batch, the mean losses and the
    teleports counted (from the StepInfo's host values: no extra read)."""
    names = run.experiment.task_names()
    run.model.train()
    progress.start(epoch + 1, run.config["epochs"], len(run.train_loader))
    loss_sum = torch.zeros(len(names), dtype=torch.float64)
    steps = conflicted = teleports = rolled_back = adapter_steps = 0
    teleport_seconds = 0.0
    started = time.perf_counter()
    for batch in run.train_loader:
        signals.check()  # a signal whose exception was dropped ends the run here
        x, targets = to_device(batch, run.device)
        losses = run.model.task_losses(x, targets)
        info = run.cost.step(dict(zip(names, losses.unbind())), (x, targets))
        loss_sum += torch.tensor(info.losses, dtype=torch.float64)
        steps += 1
        conflicted += info.min_cos_mean < 0
        if info.attempted_teleport:
            teleports += 1
            rolled_back += info.rolled_back
            adapter_steps += info.teleport_steps
            teleport_seconds += info.seconds.get("teleport", 0.0)
        progress.update((loss_sum / steps).tolist(), teleports)
    mean = (loss_sum / max(steps, 1)).tolist()
    return {
        "epoch": epoch + 1,
        "train": {f"loss/{name}": value for name, value in zip(names, mean)},
        "steps": steps,
        "conflict_ratio": conflicted / max(steps, 1),
        "teleports": teleports,
        "rolled_back": rolled_back,
        "adapter_steps": adapter_steps,
        "seconds": {"train": time.perf_counter() - started, "teleport": teleport_seconds},
    }
