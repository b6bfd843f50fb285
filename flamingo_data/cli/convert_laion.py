"""``flamingo-data convert laion``: parquet -> pair shards through img2dataset, or adopt an img2dataset output."""

from __future__ import annotations

import argparse
from dataclasses import replace

from flamingo_data.cli.options import (
    add_executor_options,
    add_fetch_options,
    add_image_options,
    add_processes_option,
    add_reject_share_option,
    check_writable,
    download_options,
    execution,
    image_policy,
    positive,
    print_summary,
)
from flamingo_data.errors import UsageError
from flamingo_data.storage import remote


def add_download_options(parser: argparse.ArgumentParser) -> None:
    add_fetch_options(parser)
    parser.add_argument(
        "--resume", action="store_true", help="reuse img2dataset's incremental mode"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run (downloads included) first"
    )
    parser.add_argument(
        "--rejects", action="store_true", help="write rejects.jsonl (url/key + reason)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--parquet", nargs="+", help="parquet files: brace patterns, globs, folders"
    )
    source.add_argument(
        "--from-img2dataset", help="adopt an existing img2dataset webdataset output"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=remote.local_form,
        help="output folder: shards + sidecar files",
    )
    parser.add_argument(
        "--url-col", default=None, help="default: detect (URL, url, image_url, ...)"
    )
    parser.add_argument("--caption-col", default=None, help="default: detect (TEXT, caption, ...)")
    # the earlier resize options: refused with the options that replace them
    parser.add_argument("--image-size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resize-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--min-size",
        type=positive,
        default=1,
        help="reject images whose shorter side is under N px",
    )
    parser.add_argument(
        "--no-extra-columns",
        action="store_true",
        help="do not copy the parquet's other columns (similarity, punsafe, ...) into <key>.json",
    )
    parser.add_argument(
        "--link",
        action="store_true",
        help="--from-img2dataset: hard-link good shards instead of copying them",
    )
    add_image_options(parser)
    for action in parser._actions:  # argparse has no public way to amend a shared option's help
        if action.dest == "max_side":
            action.help += " (default: 256 unless --short-side is given)"
    add_processes_option(parser)
    add_executor_options(parser)
    add_download_options(parser)
    add_reject_share_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--parquet downloads with img2dataset; --from-img2dataset only reads its output."""
    return [] if args.from_img2dataset else [("download", "convert laion --parquet")]


def run(args: argparse.Namespace) -> int:
    from flamingo_data.converters.laion import LAION_MAX_SIDE, LaionOptions, convert_laion
    from flamingo_data.run.units import RunOptions

    check_writable(args.out)
    if args.image_size is not None or args.resize_mode is not None:
        raise UsageError(
            "--image-size and --resize-mode are gone: LAION images go through the image stage; "
            "use --max-side N (what keep_ratio_largest did) or --short-side N"
        )
    download = download_options(args)
    if args.max_side is None and args.short_side is None:
        args.max_side = LAION_MAX_SIDE
    options = LaionOptions(
        url_col=args.url_col,
        caption_col=args.caption_col,
        download=download,
        policy=replace(image_policy(args), min_side=args.min_size),
        keep_columns=not args.no_extra_columns,
        link=args.link,
    )
    run_opts = RunOptions(
        out_dir=args.out,
        converter="laion",
        write_rejects=args.rejects,
        resume=args.resume,
        max_reject_share=args.max_reject_share,
    )
    stats = convert_laion(
        args.parquet,
        options,
        run_opts,
        from_img2dataset=args.from_img2dataset,
        overwrite=args.overwrite,
        execution=execution(args),
    )
    print_summary(stats, args, records="samples", read_from="rows")
    return 0
