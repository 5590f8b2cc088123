"""The ``cost-fast`` command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cost-fast`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="cost-fast", description="Fast gradient-based multi-task learning and COST teleportation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a toy multi-task model and print per-step Gram/conflict statistics",
        description="Train a toy shared-backbone model (linear scalarization, Adam) on synthetic "
        "conflicting binary tasks and print the per-step Gram/conflict statistics.",
    )
    demo.add_argument("--steps", type=_positive_int, default=30, help="training steps (default: 30)")
    demo.add_argument("--tasks", type=_positive_int, default=6, help="number of tasks K (default: 6)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (default: 64)")
    demo.add_argument(
        "--mode", choices=["loop", "batched"], default="loop", help="per-task gradient mode (default: loop)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cost-fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            parser.error(f"--device: {err}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        from cost_fast.demo import run_demo

        run_demo(
            steps=args.steps,
            num_tasks=args.tasks,
            batch_size=args.batch_size,
            mode=args.mode,
            seed=args.seed,
            device=str(device),
            out=sys.stdout,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
