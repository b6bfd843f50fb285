"""``flamingo-data train``: the trainer's options (``flamingo_data.train.config``) on this parser."""

from __future__ import annotations

import argparse

from flamingo_data.train.config import add_train_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.epilog = "For several processes run: torchrun --nproc_per_node=N -m flamingo_data.train <same options>"


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Training needs torch (--help is answered before this is asked)."""
    return [("train", "flamingo-data train")]


def run(args: argparse.Namespace) -> int:
    from flamingo_data.train.config import config_from_args
    from flamingo_data.train.trainer import train

    train(config_from_args(args))
    return 0
