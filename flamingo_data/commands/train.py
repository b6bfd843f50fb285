"""``flamingo-data train``: the trainer's own options (see ``flamingo_data.trainconfig``)."""

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


def run(args: argparse.Namespace) -> int:
    from flamingo_data.train import main

    if not args.train_args or args.train_args[0] in ("-h", "--help"):
        from flamingo_data.trainconfig import build_parser

        build_parser().print_help()
        return 0
    main(args.train_args)
    return 0
