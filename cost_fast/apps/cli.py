"""The ``cost-fast`` command line.

Nothing heavy is imported before ``main`` has installed its signal handlers, and the heavy
imports run with the signals deferred (``cost_fast.apps.signals``): a SIGINT or SIGTERM that
lands while torch is being imported ends the command with its one line too, once the import is
done.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import warnings
from typing import TYPE_CHECKING

from cost_fast.apps import signals

if TYPE_CHECKING:
    import torch

EXPERIMENT_NAMES = ("cityscapes", "nyuv2", "celeba")  # cost_fast.experiments.paper.EXPERIMENTS

# the module each command runs from, imported before it starts (while signals are deferred)
COMMAND_MODULES = {
    "demo": "cost_fast.apps.demo",
    "profile": "cost_fast.apps.profile",
    "bench": "cost_fast.bench.runner",
    "toy": "cost_fast.apps.toy",
    "reproduce": "cost_fast.apps.reproduce",
    "train": "cost_fast.apps.train",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed torch's generators take: an int in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an int: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """A finite float ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cost-fast`` and its subcommands."""
    from cost_fast.apps import train_options
    from cost_fast.apps.toy import PROTOCOLS
    from cost_fast.teleport.semantics import SEMANTICS

    parser = argparse.ArgumentParser(
        prog="cost-fast", description="Fast gradient-based multi-task learning and COST teleportation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a base method with and without COST on the 8x8 digits (CPU) and write a report",
        description="Train a base multi-task method alone and with COST on scikit-learn's 8x8 digits cast "
        "as 10 one-vs-rest binary tasks, and write a report folder (metrics.json and PNG plots).",
    )
    demo.add_argument("--out", default="demo_report", help="report folder (default: demo_report)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="epochs (default: 10)")
    demo.add_argument("--method", default="fairgrad", help="base method, a Gram-based aggregator (default: fairgrad)")
    demo.add_argument(
        "--semantics",
        choices=sorted(SEMANTICS),
        default="public",
        help="COST semantics (default: public, the public code's)",
    )
    demo.add_argument(
        "--gradients",
        choices=["exact", "representation"],
        default="exact",
        help="per-task gradients of the shared parameters (exact, default) or of the backbone's output",
    )
    demo.add_argument(
        "--teleport",
        choices=["lora", "loha", "rescale"],
        default="lora",
        help="teleport: a LoRA or LoHa adapter (COST), or hidden-unit rescaling (group action, Zhao et al.)",
    )
    demo.add_argument("--hidden", type=_positive_int, default=16, help="shared backbone width (default: 16)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    demo.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof = sub.add_parser(
        "profile",
        help="torch.profiler breakdown of a step and a teleport, fast engine vs the yardstick",
        description="Profile one ordinary step and one teleport on a CelebA-shaped workload, fast engine "
        "against the yardstick; writes summary.txt and a Chrome trace per phase.",
    )
    prof.add_argument("--out", default="profile_report", help="report folder (default: profile_report)")
    prof.add_argument("--tasks", type=_positive_int, default=40, help="number of tasks K (default: 40)")
    prof.add_argument("--width", type=_positive_int, default=8, help="CNN width (default: 8; 64 is CelebA's)")
    prof.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default: 8)")
    prof.add_argument("--rows", type=_positive_int, default=12, help="top operations per phase (default: 12)")
    prof.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suites (kernels vs torch, solvers, teleport, adapter, epochs, the experiments' epochs) and write JSON + plots",
        description="Run the pytest-benchmark suites on this machine's device (CUDA if present): each kernel "
        "against its plain torch way, the solvers against scipy/cvxpy, one teleport and one epoch, base vs COST "
        "fast vs COST yardstick. Writes <suite>_<device>.json, a PNG each and summary_<device>.md; other files "
        "in the output folder are kept.",
    )
    bench.add_argument("--out", default="bench_report", help="output folder (default: bench_report)")
    bench.add_argument(
        "--suites",
        default="all",
        help="comma-separated suites among gram, grads, solvers, teleport, adapter, epoch, train (default: all)",
    )
    bench.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting benchmarks")
    toy = sub.add_parser(
        "toy",
        help="LS and LS+COST on CAGrad's two-task toy from several starting points",
        description="Linear scalarization alone and with COST on the two-task toy of CAGrad (COST paper, "
        "Fig. 6): trajectories over the loss landscape, final losses against the Pareto front, a table.",
    )
    toy.add_argument("--out", default="toy_report", help="report folder (default: toy_report)")
    toy.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="nash-mtl",
        help="nash-mtl: 5 starts, 3000 steps at lr 0.01 (default); cagrad: CAGrad's 3 starts, 100000 steps at lr 1e-3",
    )
    toy.add_argument("--steps", type=_positive_int, default=None, help="Adam steps per run (default: the protocol's)")
    toy.add_argument("--seed", type=_seed, default=0, help="seed of COST's generator (default: 0)")
    toy.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=100,
        help="steps between COST epochs, i.e. at most one teleport per this many steps (default: 100)",
    )
    toy.add_argument(
        "--semantics",
        choices=sorted(SEMANTICS),
        default="public",
        help="COST semantics (default: public, the public code's)",
    )
    toy.add_argument(
        "--level-set-tolerance",
        type=_non_negative_float,
        default=None,
        help="make every teleport loss-preserving: merge the largest share of its update that changes "
        "no task loss by more than this share of its size (default: merge the whole update, as the public code)",
    )
    train = sub.add_parser(
        "train",
        help="one of the COST paper's experiments (cityscapes, nyuv2, celeba), a method with or without COST",
        description="Train on CityScapes, NYUv2 or CelebA with the paper's recipe (every option can change it): "
        "a run folder with per-epoch metrics (JSON, CSV, plots), a checkpoint per epoch that --resume continues "
        "exactly, and the reported test metrics with Δm%% in results.json. Options may also come from --config.",
        argument_default=argparse.SUPPRESS,
    )
    train_options.add_arguments(train, EXPERIMENT_NAMES)
    rep = sub.add_parser(
        "reproduce",
        help="the COST paper's claims beside what this engine measures (REPRODUCTION.md)",
        description="Run the digits demo and the CAGrad toy, then write REPRODUCTION.md: each of the paper's "
        "qualitative claims with our measurement, a verdict and the figure that shows it.",
    )
    rep.add_argument("--out", default="reproduction", help="report folder (default: reproduction)")
    rep.add_argument("--quick", action="store_true", help="small runs (seconds), for a smoke test")
    rep.add_argument("--seeds", type=_positive_int, default=5, help="seeds to run every experiment with (default: 5)")
    return parser


def _device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {text!r} is not a CPU or CUDA device")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cost-fast``; returns the exit status (128 + the signal's number after a
    SIGINT or SIGTERM, with one line on stderr; the handlers the caller had are put back)."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signals.begin()
    signals.install()
    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words else ""
    try:
        with signals.deferred():  # the heavy imports (signals module docstring)
            parser = build_parser()
            args = parser.parse_args(argv)
            command = args.command
            importlib.import_module(COMMAND_MODULES[command])
            from cost_fast.apps import report
            from cost_fast.info import QuietTriggerWarning

        report.begin_run()  # what an earlier command of this process saw at its target does not count
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QuietTriggerWarning)  # the reports count the teleports
            return _run(parser, args)
    except BaseException as err:
        # Whatever exception a signal became on its way (signals module docstring), the run
        # was interrupted or terminated all the same.
        signum = signals.received()
        # a training run keeps what it wrote (its finished epochs); a report is written whole or not at all
        outcome = "its finished epochs are kept (--resume continues)" if command == "train" else "no report was written"
        if signum is not None:
            what = "interrupted" if signum == signal.SIGINT else f"terminated (signal {signum})"
            print(f"cost-fast {command}: {what}; {outcome}", file=sys.stderr)
            return 128 + signum
        if isinstance(err, KeyboardInterrupt):  # a SIGINT before the handlers (or a caller's own)
            print(f"cost-fast {command}: interrupted; {outcome}", file=sys.stderr)
            return 128 + signal.SIGINT
        if isinstance(err, OSError):  # a full disk, a busy or vanished folder: one line, not a traceback
            where = f" ({err.filename})" if err.filename else ""
            print(f"cost-fast {command}: error: {err.strerror or err}{where}; {outcome}", file=sys.stderr)
            return 1
        raise
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        signals.begin()  # the note of this command's signal ends with it


def _refuse(parser: argparse.ArgumentParser, err: Exception) -> None:
    """A command's refusal as argparse's usage error (exit 2), unless a signal is what ended it
    (an ``except ImportError`` that turned it into a message, say): then the signal's one line."""
    signals.check()
    parser.error(str(err))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit status."""
    if args.command == "profile":
        from cost_fast.apps.profile import run_profile

        device = _device(parser, args.device)
        try:
            run_profile(
                args.out,
                num_tasks=args.tasks,
                width=args.width,
                batch_size=args.batch_size,
                rows=args.rows,
                device=str(device),
                out=sys.stdout,
            )
        except ValueError as err:
            _refuse(parser, err)
    if args.command == "bench":
        from cost_fast.bench.runner import SUITES, run_benchmarks

        suites = SUITES if args.suites == "all" else [s.strip() for s in args.suites.split(",")]
        try:
            run_benchmarks(args.out, suites, keyword=args.keyword, stream=sys.stdout)
        except ValueError as err:
            _refuse(parser, err)
        except RuntimeError as err:
            print(f"cost-fast bench: error: {err}", file=sys.stderr)
            return 1
    if args.command == "reproduce":
        from cost_fast.apps.reproduce import run_reproduction

        try:
            run_reproduction(args.out, quick=args.quick, seeds=args.seeds, stream=sys.stdout)
        except ValueError as err:
            _refuse(parser, err)
    if args.command == "toy":
        from cost_fast.apps.toy import run_toy

        try:
            run_toy(
                args.out,
                protocol=args.protocol,
                steps=args.steps,
                steps_per_epoch=args.steps_per_epoch,
                semantics=args.semantics,
                seed=args.seed,
                level_set_tolerance=args.level_set_tolerance,
                stream=sys.stdout,
            )
        except ValueError as err:
            _refuse(parser, err)
    if args.command == "train":
        from cost_fast.apps.train import run_train
        from cost_fast.apps.train_options import given_options

        try:
            given = given_options(args)
            run_train(args.experiment, given, resume=getattr(args, "resume", False), stream=sys.stdout)
        except ValueError as err:
            _refuse(parser, err)
    if args.command == "demo":
        device = _device(parser, args.device)
        from cost_fast.apps.demo import run_demo
        from cost_fast.methods import list_aggregators

        gram_methods = sorted(n for n, kind in list_aggregators().items() if kind == "gram")
        if args.method not in gram_methods:
            parser.error(f"--method: unknown or not Gram-based: {args.method!r}; choose from {', '.join(gram_methods)}")
        try:
            run_demo(
                args.out,
                epochs=args.epochs,
                method=args.method,
                semantics=args.semantics,
                hidden=args.hidden,
                batch_size=args.batch_size,
                seed=args.seed,
                device=str(device),
                gradients=args.gradients,
                teleport=args.teleport,
                stream=sys.stdout,
                progress=not args.no_progress,
            )
        except (ValueError, RuntimeError) as err:
            _refuse(parser, err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
