"""The options of ``cost-fast train``: one table (``OPTIONS``) from which the command line, the
config file and the run's ``config.json`` are read, so that each option is checked the same way
wherever it comes from.

Where a value comes from, first match wins: the command line, then ``--config FILE`` (a JSON
object of option names, ``batch_size`` or ``batch-size``, and ``method_args``), then the
experiment's recipe (``cost_fast.experiments``: the paper's), then the table's default. A
resumed run takes its stored configuration; an option given again must agree with it, except
those in ``RESUMABLE`` (more epochs, another device, workers or progress output, the data
folder where it was moved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RESUMABLE = frozenset({"epochs", "device", "workers", "progress", "data"})


def _int_at_least(low: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise ValueError(f"must be ≥ {low}, got {number}")
        return number

    return convert


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return number


def _seed(value: Any) -> int:
    number = _int_at_least(0)(value)
    if number >= 2**63:
        raise ValueError(f"must be below 2**63, got {number}")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: how a value is checked (``convert`` raises ValueError), its default (None:
    the recipe's, or none), its help, its choices."""

    convert: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    def check(self, name: str, value: Any) -> Any:
        """``value`` converted, or ValueError naming the option."""
        if value is None and self.default is None:
            return None
        try:
            converted = self.convert(value)
        except ValueError as err:
            raise ValueError(f"--{name.replace('_', '-')}: {err}") from None
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"--{name.replace('_', '-')}: {converted!r} is not one of {', '.join(self.choices)}")
        return converted


def _option_table() -> dict[str, Option]:
    from cost_fast.teleport.semantics import SEMANTICS, TRIGGERS

    count, positive = _int_at_least(1), _int_at_least(0)
    return {
        "data": Option(_text, None, "the data set's folder (its layout: docs/experiments.md)", metavar="DIR"),
        "synthetic": Option(_flag, False, "random data of the real shapes instead of --data (smoke runs, benchmarks)"),
        "samples": Option(count, None, "--synthetic: training samples (default: 2 batches; the test split has half)"),
        "out": Option(_text, None, "the run folder (default: train_EXPERIMENT)", metavar="DIR"),
        "epochs": Option(count, None, "epochs (default: the recipe's)"),
        "batch_size": Option(count, None, "batch size (default: the recipe's)"),
        "lr": Option(_positive_float, None, "Adam's learning rate (default: the recipe's)"),
        "lr_halving_epoch": Option(positive, None, "halve the learning rate every this many epochs (0: never)"),
        "method": Option(_text, None, "the base method, any name of list_aggregators() (default: fairgrad)"),
        "cost": Option(_flag, True, "COST on top of the method (--no-cost: the method alone)"),
        "cost_start_epoch": Option(positive, None, "no teleport before this epoch (the public code's lora_epoch)"),
        "teleports_per_epoch": Option(positive, None, "at most this many teleports per epoch (tele_times_per_epoch)"),
        "teleport_rounds": Option(count, None, "passes over the training data per teleport (tele_round)"),
        "teleport_samples": Option(count, None, "perturbations n per adapter step (grad_sampling_times)"),
        "teleport_steps": Option(count, None, "at most this many adapter steps per teleport (default: no limit)"),
        "teleport_lr": Option(_positive_float, None, "the adapter's learning rate (default: --lr)"),
        "adapter": Option(_text, "lora", "the teleport's adapter", choices=("lora", "loha", "rescale")),
        "rank": Option(count, 5, "the adapter's rank (default: 5)"),
        "semantics": Option(_text, "public", "COST's semantics (default: public)", choices=tuple(sorted(SEMANTICS))),
        "trigger": Option(_text, None, "another trigger (Table 7; default: the semantics')", choices=tuple(TRIGGERS)),
        "htr": Option(_flag, True, "reuse Adam's history after a teleport (--no-htr: Table 4's ablation)"),
        "base_step": Option(
            _text,
            "public",
            "public: the public code's step (per-task heads, K·Gᵀw, shared gradients clipped to 1); "
            "method: the method's own",
            choices=("public", "method"),
        ),
        "model": Option(_text, None, "CityScapes/NYUv2: mtan (default) or segnet", choices=("mtan", "segnet")),
        "width": Option(count, None, "the network's base width (default: 64, the papers')"),
        "augment": Option(_flag, None, "scale-crop and flip the dense training images (default: the recipe's)"),
        "workers": Option(positive, 2, "data loader worker processes (default: 2)"),
        "device": Option(_text, "cpu", "torch device: cpu, cuda, cuda:1 (default: cpu)"),
        "seed": Option(_seed, 0, "seed of the model, the shuffling, the augmentation and COST (default: 0)"),
        "baselines": Option(_text, None, "a JSON file {metric: single-task value} for Δm%", metavar="FILE"),
        "progress": Option(_flag, True, "a progress bar per epoch (--no-progress: one line per epoch)"),
    }


def options() -> dict[str, Option]:
    """The option table (module docstring)."""
    return _option_table()


def add_arguments(parser: argparse.ArgumentParser, experiments: tuple[str, ...]) -> None:
    """The ``train`` subcommand's arguments, from the table. Only the options given reach the
    namespace (``argument_default=SUPPRESS``), so that ``resolve`` knows what was given."""
    parser.add_argument("experiment", choices=experiments, help="the experiment: " + ", ".join(experiments))
    for name, option in options().items():
        flag = "--" + name.replace("_", "-")
        if option.convert is _flag:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=option.help)
        else:
            parser.add_argument(flag, dest=name, help=option.help, metavar=option.metavar or name.upper())
    parser.add_argument(
        "--method-arg",
        dest="method_args",
        action="append",
        metavar="NAME=VALUE",
        help="a hyper-parameter of the method (repeat for more), e.g. alpha=2.0",
    )
    parser.add_argument("--config", dest="config", metavar="FILE", help="a JSON file of options (module docstring)")
    parser.add_argument("--resume", dest="resume", action="store_true", help="continue the run in --out")


def _method_args(items: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--method-arg: expected NAME=VALUE, got {item!r}")
        try:
            args[name] = json.loads(text)
        except json.JSONDecodeError:
            args[name] = text  # a word, e.g. solver=momentum
    return args


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a ``--config`` file, checked (unknown names, bad values: ValueError)."""
    file = Path(path)
    try:
        loaded = json.loads(file.read_text())
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}: not JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a JSON object of options")
    table = options()
    given: dict[str, Any] = {}
    for key, value in loaded.items():
        name = key.replace("-", "_")
        if name == "method_args":
            if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
                raise ValueError(f"--config {path}: method_args must be an object of hyper-parameters")
            given[name] = dict(value)
        elif name in table:
            given[name] = table[name].check(name, value)
        else:
            raise ValueError(f"--config {path}: unknown option {key!r}")
    return given


def given_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """The options the command line gave (converted and checked), with the config file's under
    them; ``method_args`` as a dict."""
    table = options()
    raw = {k: v for k, v in vars(namespace).items() if k not in ("command", "experiment", "config", "resume")}
    given = read_config_file(namespace.config) if getattr(namespace, "config", None) else {}
    for name, value in raw.items():
        if name == "method_args":
            given["method_args"] = {**given.get("method_args", {}), **_method_args(value)}
        else:
            given[name] = table[name].check(name, value)
    return given


def resolve(given: Mapping[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's value for a new run: ``given``, else the recipe's, else the default; the
    method's hyper-parameters are the recipe's (when it is the recipe's method) updated by the
    given ones."""
    table = options()
    config = {name: given.get(name, recipe.get(name, option.default)) for name, option in table.items()}
    # the recipe's hyper-parameters belong to the recipe's method (FairGrad's alpha), not another
    preset = dict(recipe.get("method_args", {})) if config["method"] == recipe.get("method") else {}
    config["method_args"] = {**preset, **given.get("method_args", {})}
    return config


def merge_for_resume(stored: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The stored configuration with the ``RESUMABLE`` options given now; ValueError naming
    the first other option given with another value."""
    config = dict(stored)
    for name, value in given.items():
        if name in RESUMABLE:
            config[name] = value
        elif stored.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"--resume continues the run as it was configured: {flag} was {stored.get(name)!r} there, "
                f"{value!r} now (only {', '.join(sorted('--' + r for r in RESUMABLE))} may change)"
            )
    return config
