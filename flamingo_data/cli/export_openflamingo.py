"""``flamingo-data export-openflamingo``: a run's weights as an OpenFlamingo ``checkpoint.pt``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a run folder (its latest checkpoint) or one checkpoint folder in it"
    )
    parser.add_argument("--out", required=True, help="the checkpoint.pt to write")


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The model is rebuilt with torch; a Hugging Face LM needs transformers (checked when built)."""
    return [("train", "flamingo-data export-openflamingo")]


def run(args: argparse.Namespace) -> int:
    from flamingo_data.train.export import export_openflamingo

    result = export_openflamingo(args.source, args.out)
    print(
        f"wrote {result['out']}: {result['keys']} OpenFlamingo keys from {result['checkpoint']}"
        f" (step {result['step']})"
    )
    return 0
