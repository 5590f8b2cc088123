"""``cost-fast train EXPERIMENT``: one of the COST paper's experiments (``cost_fast.experiments.
paper``), a base method with or without COST, with a run folder that can be resumed.

Before any work: every option is checked (``cost_fast.apps.train_options``), the method built
with its hyper-parameters, the data folder checked whole (``check_split`` / ``check_folder``)
and the run folder checked (``cost_fast.apps.run_folder``); each refusal is one line.

Each epoch (``cost_fast.apps.train_run``): one ``cost.step`` per batch of the training split
(COST's teleport data: a second loader over it), a progress bar with the mean losses and the
teleports so far, the learning-rate schedule; then the test split (and CelebA's validation
split) evaluated, and the epoch's row, ``metrics.json``, ``metrics.csv``, ``curves.png`` and the
checkpoint (model, optimizer, schedule, COST, the history) written. Because every random stream
is seeded per epoch or kept in the checkpoint, ``--resume`` continues from the last checkpoint
exactly as the uninterrupted run would have gone. When the last epoch is done,
``results.json`` holds the reported test metrics and Δm% (``cost_fast.apps.train_report``).
Without COST (``--no-cost``) the same step runs with no teleport, so that the two rows of a
comparison differ by the teleports alone.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch

from cost_fast import checkpoint
from cost_fast.apps import signals, train_options, train_report
from cost_fast.apps.run_folder import RunFolder, check
from cost_fast.apps.train_run import Progress, TrainingRun, build_method
from cost_fast.experiments.paper import EXPERIMENTS, Experiment

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"


def check_config(config: dict[str, Any], experiment: Experiment) -> None:
    """Refuse a configuration that cannot run (ValueError, one line); fill the default that
    depends on others (``samples``: 2 batches)."""
    if config["synthetic"] == (config["data"] is not None):
        raise ValueError("give the data folder with --data DIR, or --synthetic for random data of its shapes")
    if config["samples"] is not None and not config["synthetic"]:
        raise ValueError("--samples is for --synthetic data")
    if config["synthetic"] and config["samples"] is None:
        config["samples"] = 2 * config["batch_size"]
    if experiment.name == "celeba":
        for name in ("model", "augment"):
            if config[name] is not None:
                raise ValueError(f"--{name}: CelebA's recipe has one model and no augmentation")
    if config["adapter"] == "rescale" and config["rank"] != 5:
        raise ValueError("--rank is the LoRA/LoHa adapter's; the rescaling teleport has none")
    build_method(config, len(experiment.task_names()))


def check_device(text: str) -> torch.device:
    """The torch device ``text`` names, if this machine has it (ValueError otherwise)."""
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {text!r} is not a CPU or CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _baselines(config: Mapping[str, Any], experiment: Experiment) -> dict[str, float] | None:
    metrics = experiment.metrics()
    if config["baselines"] is None:  # the paper's single-task values describe its data, not random data
        return None if config["synthetic"] else experiment.baselines()
    try:
        given = json.loads(Path(config["baselines"]).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--baselines {config['baselines']}: cannot read it as JSON ({err})") from None
    if not isinstance(given, dict) or set(given) != set(metrics):
        missing = sorted(set(metrics) - set(given)) if isinstance(given, dict) else sorted(metrics)
        raise ValueError(f"--baselines: expected a value for each of {len(metrics)} metrics; missing {missing[:3]}")
    values = {}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value == 0:
            raise ValueError(f"--baselines: {name} must be a finite non-zero number, got {value!r}")
        values[name] = float(value)
    return values


def run_train(
    experiment_name: str, given: Mapping[str, Any], *, resume: bool = False, stream: TextIO = sys.stdout
) -> Path:
    """Run (or with ``resume``, continue) one experiment (module docstring); returns the run
    folder. ``given``: the options given (``train_options.given_options``).

    Raises:
        ValueError: a refusal before any work (an option, the data, the run folder).
    """
    experiment = EXPERIMENTS[experiment_name]
    out = given.get("out") or f"train_{experiment_name}"
    marker = check(out, resume=resume)
    if resume:
        if marker.get("experiment") != experiment_name:
            raise ValueError(f"--resume: {out} holds a {marker.get('experiment')} run, not a {experiment_name} one")
        try:
            stored = json.loads((Path(out) / CONFIG).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume: cannot read {Path(out) / CONFIG} ({err})") from None
        config = train_options.merge_for_resume(stored, {**given, "out": stored["out"]})
        if marker.get("epochs_done", 0) >= config["epochs"]:
            raise ValueError(f"--resume: the run has done its {marker['epochs_done']} epochs; give --epochs N > that")
    else:
        config = train_options.resolve({**given, "out": out}, experiment.recipe)
        check_config(config, experiment)
    device = check_device(config["device"])
    baselines = _baselines(config, experiment)
    with signals.deferred():  # the data check may take seconds; a signal ends it after
        splits = experiment.splits(config)
    folder = RunFolder(out, resume=resume, experiment=experiment_name)
    try:
        return _train(config, experiment, splits, baselines, folder, device, resume, stream)
    finally:
        folder.close()


def _train(config, experiment, splits, baselines, folder, device, resume, stream) -> Path:
    run = TrainingRun(config, experiment, splits, device)
    history: list[dict[str, Any]] = []
    if resume and folder.marker["epochs_done"] == 0 and not (folder.path / CHECKPOINT).exists():
        pass  # stopped in its first epoch: it starts again, as configured
    elif resume:
        state = checkpoint.load(folder.path / CHECKPOINT)
        try:
            run.load_state_dict(state["run"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"--resume: {folder.path / CHECKPOINT}: {err}") from None
        history = list(state["history"])
    else:
        folder.write(CONFIG, json.dumps(config, indent=1))
    higher = experiment.metrics()
    progress = Progress(stream, config["progress"])
    print(f"cost-fast train {experiment.name}: {describe(config)} -> {folder.path}", file=stream, flush=True)
    for epoch in range(len(history), config["epochs"]):
        row = run.train_epoch(epoch, progress)
        started = time.perf_counter()
        row.update(run.evaluate())
        row["seconds"]["eval"] = time.perf_counter() - started
        row["delta_m"] = train_report.epoch_delta_m(row["test"], baselines, higher)
        history.append(row)
        _write_epoch(folder, history, run, list(higher), epoch + 1)
        progress.end(_epoch_line(row))
    results = train_report.reported(history, experiment.report, baselines, higher)
    folder.write("results.json", json.dumps(results, indent=1))
    delta = "" if results["delta_m"] is None else f", Δm% {results['delta_m']:.2f}"
    print(f"done: {results['reported']}{delta}; {folder.path}/results.json", file=stream, flush=True)
    return folder.path


def _write_epoch(folder, history, run: TrainingRun, metric_names, epochs_done: int) -> None:
    """The epoch's files (module docstring); the checkpoint last, so that a run killed while
    they are written resumes from the epoch before and writes them again."""
    folder.write("metrics.json", json.dumps(history, indent=1))
    folder.write("metrics.csv", train_report.metrics_csv(history))
    try:
        folder.write("curves.png", train_report.curves_png(history, metric_names))
    except ImportError:
        pass  # no matplotlib: the JSON and CSV hold the same numbers
    checkpoint.save(folder.file(CHECKPOINT), {"run": run.state_dict(), "history": history})
    folder.epochs_done(epochs_done)


def describe(config: Mapping[str, Any]) -> str:
    """One line of what the run does."""
    method = config["method"] + "".join(f" {k}={v}" for k, v in config["method_args"].items())
    cost = (
        f"+ COST (from epoch {config['cost_start_epoch']}, ≤{config['teleports_per_epoch']}/epoch, "
        f"{config['adapter']} r={config['rank']}, {config['semantics']}{'' if config['htr'] else ', no HTR'})"
        if config["cost"]
        else "alone"
    )
    data = f"synthetic x{config['samples']}" if config["synthetic"] else config["data"]
    return f"{method} {cost}, {config['epochs']} epochs of batch {config['batch_size']}, lr {config['lr']:g}, {data}"


def _epoch_line(row: Mapping[str, Any]) -> str:
    test = row["test"]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in list(test.items())[:4] if not k.startswith("loss/"))
    delta = "" if row["delta_m"] is None else f", Δm% {row['delta_m']:.2f}"
    seconds = row["seconds"]
    return (
        f"epoch {row['epoch']}: test {shown}{delta}; teleports {row['teleports']}; "
        f"{seconds['train']:.1f} s train ({seconds['teleport']:.1f} s teleport), {seconds['eval']:.1f} s eval"
    )
