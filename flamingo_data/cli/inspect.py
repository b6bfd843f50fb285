"""``flamingo-data inspect``: a dataset summary, as a table, JSON, or histograms."""

from __future__ import annotations

import argparse
import json

from flamingo_data.cli.options import UsageError, add_progress_option, finite, positive
from flamingo_data.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shards: brace patterns, globs or folders")
    parser.add_argument(
        "--tokenizer", default=None, help="local Hugging Face tokenizer path (default: built-in)"
    )
    parser.add_argument(
        "--threshold", type=finite, default=0.24, help="similarity threshold the loader will use"
    )
    parser.add_argument(
        "--max-images", type=positive, default=6, help="images per sample the loader will keep"
    )
    parser.add_argument(
        "--max-tokens", type=positive, default=256, help="tokens per sample the loader will keep"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="write histograms to this PNG (needs matplotlib)",
    )
    add_progress_option(parser)


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--plot draws with matplotlib; --tokenizer loads with transformers."""
    needed = [("plot", "inspect --plot")] if args.plot else []
    return needed + ([("hf", "inspect --tokenizer")] if args.tokenizer else [])


def run(args: argparse.Namespace) -> int:
    from flamingo_data.check.inspect import format_report, inspect_shards, plot_report

    report = inspect_shards(
        args.shards,
        tokenizer=_tokenizer(args.tokenizer),
        threshold=args.threshold,
        max_images=args.max_images,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    print(json.dumps(report.to_json(), indent=1) if args.json else format_report(report))
    if args.plot:
        try:
            plot_report(report, args.plot)
        except InputError as exc:
            raise UsageError(f"--plot: {exc}") from exc
        print(f"histograms written to {args.plot}")
    return 0


def _tokenizer(path: str | None):
    """A --tokenizer that is not a local tokenizer is bad input (exit 2), not a traceback."""
    from flamingo_data.loader.tokenizer import make_tokenizer

    try:
        return make_tokenizer(path)
    except InputError:
        raise  # the [hf] extra is not installed: its own message
    except (OSError, ValueError) as exc:  # no such folder, or no tokenizer files in it
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load --tokenizer {path}: {first_line}") from exc
