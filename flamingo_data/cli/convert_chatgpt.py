"""``flamingo-data convert chatgpt``: sequences + images by url -> GPT shards."""

from __future__ import annotations

import argparse

from flamingo_data.cli.convert_laion import add_download_options
from flamingo_data.cli.options import (
    add_image_options,
    add_processes_option,
    add_reject_share_option,
    add_unit_options,
    check_writable,
    download_options,
    execution,
    image_policy,
    positive,
    print_summary,
    run_options,
)
from flamingo_data.storage import remote


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sequences", required=True, nargs="+", help="JSON array / JSONL files (patterns, folders)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=remote.local_form,
        help="output folder: shards + sidecar files",
    )
    parser.add_argument(
        "--url-key", default="auto", help="image_map key holding the url (auto: url, raw_url, ...)"
    )
    parser.add_argument(
        "--images-from", default=None, help="join against an existing img2dataset output by url"
    )
    parser.add_argument(
        "--missing",
        choices=("drop", "strip"),
        default="drop",
        help="a sequence with an unavailable image: drop it, or strip that placeholder and renumber",
    )
    add_processes_option(parser)
    # the earlier name of --processes, kept so that existing scripts run
    parser.add_argument(
        "--units-processes",
        type=positive,
        dest="processes",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_image_options(parser)
    add_download_options(parser)
    add_unit_options(parser)
    add_reject_share_option(parser)


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Images are downloaded with img2dataset unless --images-from names a finished download."""
    return [] if args.images_from else [("download", "convert chatgpt without --images-from")]


def run(args: argparse.Namespace) -> int:
    from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt

    check_writable(args.out)
    download = download_options(args)
    options = ChatGptOptions(
        url_key=args.url_key,
        images_from=args.images_from,
        missing=args.missing,
        policy=image_policy(args),
        download=download,
    )
    stats = convert_chatgpt(
        args.sequences,
        options,
        run_options(args, "chatgpt"),
        overwrite=args.overwrite,
        execution=execution(args),
    )
    print_summary(stats, args)
    return 0
