"""``flamingo-data demo``: bundled sample -> shards -> validate -> inspect -> preview -> a few training steps."""

from __future__ import annotations

import argparse

from flamingo_data.cli.options import check_writable, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="demo-output", help="folder for every artifact (default: demo-output)"
    )
    parser.add_argument(
        "--steps", type=positive, default=12, help="training steps of the tiny model (default 12)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sample's documents and of the training"
    )
    parser.add_argument(
        "--no-train", action="store_true", help="stop after the data steps (no torch needed)"
    )


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [] if args.no_train else [("train", "demo's training step (--no-train skips it)")]


def run(args: argparse.Namespace) -> int:
    from flamingo_data.demo.run import run_demo

    check_writable(args.out)  # one line and exit 2, not advice to --resume a run that never began
    result = run_demo(args.out, steps=args.steps, seed=args.seed, train=not args.no_train)
    print("\nflamingo-data demo finished. Artifacts:")
    for name, path in result.artifacts.items():
        print(f"  {name:<12} {path}")
    print("Numbers:")
    for name, value in result.numbers.items():
        print(f"  {name:<28} {value}")
    return 0 if result.ok else 1
