"""``flamingo-data train``: the trainer's own options (see ``flamingo_data.train.config``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="trainer options, e.g. --mmc4-shards 'shards/*.tar' --run-dir runs/x "
        "(flamingo-data train --help lists them)",
    )
    parser.epilog = "For several processes run: torchrun --nproc_per_node=N -m flamingo_data.train <same options>"


def _wants_help(args: argparse.Namespace) -> bool:
    return not args.train_args or args.train_args[0] in ("-h", "--help")


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Training needs torch; the option list (--help) does not."""
    return [] if _wants_help(args) else [("train", "flamingo-data train")]


def run(args: argparse.Namespace) -> int:
    if _wants_help(args):
        from flamingo_data.train.config import build_parser

        build_parser().print_help()
        return 0
    from flamingo_data.train.trainer import main

    main(args.train_args)
    return 0
