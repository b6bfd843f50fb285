"""``flamingo-data validate``: exit 0 only when every shard is fit for training."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from flamingo_data.cli.options import UsageError, add_progress_option, non_negative, positive
from flamingo_data.images.stage import DEFAULT_MAX_PIXELS
from flamingo_data.run.executors import default_processes

if TYPE_CHECKING:
    from flamingo_data.check.validate import ValidationReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shards: brace patterns, globs or folders")
    parser.add_argument(
        "--deep", action="store_true", help="also decode every image (pixel cap on)"
    )
    parser.add_argument(
        "--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, help="--deep: larger images fail"
    )
    parser.add_argument(
        "--kind",
        choices=("auto", "interleaved", "gpt", "pair"),
        default="auto",
        help="the record kind to check against (auto: each sample's own)",
    )
    parser.add_argument(
        "--write-sizes", action="store_true", help="write/update sizes.json beside the shards"
    )
    parser.add_argument(
        "--sizes", default=None, help="sizes.json path (default: beside the shards)"
    )
    parser.add_argument(
        "--json", dest="json_out", default=None, help="write the full report as JSON (- for stdout)"
    )
    parser.add_argument(
        "--processes",
        type=positive,
        default=default_processes(),
        help="shards checked in parallel (default: cores)",
    )
    parser.add_argument(
        "--max-failures-shown",
        type=non_negative,
        default=20,
        help="failures listed on stdout (--json holds them all)",
    )
    add_progress_option(parser)


def run(args: argparse.Namespace) -> int:
    from flamingo_data.check.validate import validate_shards

    report_file = _open_report(args.json_out)
    report = validate_shards(
        args.shards,
        deep=args.deep,
        kind=args.kind,
        write_sizes=args.write_sizes,
        sizes_path=args.sizes,
        max_pixels=args.max_pixels,
        processes=args.processes,
        progress=not args.no_progress,
    )
    if args.json_out == "-":
        json.dump(report.to_json(), sys.stdout, indent=1)
        print()
    else:
        print_summary(report, args.max_failures_shown)
        if report_file is not None:
            with report_file:
                json.dump(report.to_json(), report_file, indent=1)
                report_file.write("\n")
    return 0 if report.ok else 1


def _open_report(path: str | None) -> TextIO | None:
    """Open --json's file before the (maybe hour-long) validation, so a bad path fails first."""
    if path in (None, "-"):
        return None
    try:
        return open(path, "w")  # noqa: SIM115 -- closed after the report is written
    except OSError as exc:
        raise UsageError(f"cannot write the --json report to {path}: {exc.strerror}") from exc


def print_summary(report: ValidationReport, limit: int) -> None:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.kinds.items())) or "none"
    print(
        f"{report.shards} shards, {report.samples} samples ({kinds}), {report.images} images checked"
    )
    _print_open_flamingo_skips(report)
    if report.ok:
        print("OK: fit for training")
        return
    print(f"FAILED: {len(report.failures)} problems")
    for reason, count in report.reasons().most_common():
        print(f"  {reason}: {count}")
    for failure in report.failures[:limit]:
        line = f"  {failure.shard} {failure.key or '<shard>'}: {failure.reason} {failure.detail}"
        print(printable(line.rstrip()))
    if len(report.failures) > limit:
        print(f"  ... {len(report.failures) - limit} more (use --json for all)")


def _print_open_flamingo_skips(report: ValidationReport) -> None:
    """A note, not a failure: resized shards hold small images, which our loader keeps."""
    skips = report.open_flamingo_skips
    if skips["images"]:
        print(
            f"note: open_flamingo's own loader would skip {skips['images']} interleaved images"
            f" (under 11,000 bytes) and {skips['documents']} documents left without one;"
            " flamingo-data's loader keeps them (README: \"Shards for open_flamingo's loader\")"
        )


def printable(text: str) -> str:
    """``text`` with what a terminal must not receive escaped as Python does (``\\udcff``,
    ``\\x1b``): member names come from untrusted tars, and a name that is not UTF-8 (kept as lone
    surrogates) stopped the summary with UnicodeEncodeError on a UTF-8 stdout, losing the report;
    an escape sequence in a name would reach the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
