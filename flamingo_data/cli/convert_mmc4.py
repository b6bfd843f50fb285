"""``flamingo-data convert mmc4``: MMC4 document shards + images (on disk or downloaded here) ->
interleaved shards."""

from __future__ import annotations

import argparse

from flamingo_data.cli.options import (
    add_document_options,
    add_image_options,
    add_run_options,
    check_retry_failed,
    check_writable,
    download_images_extra,
    execution,
    image_policy,
    images_download,
    print_summary,
    run_options,
)
from flamingo_data.converters.mmc4 import LAYOUTS, Mmc4Options, convert_mmc4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docs",
        required=True,
        nargs="+",
        help=".zip, .jsonl, .jsonl.gz or .jsonl.zst document shards: brace pattern, glob or folder",
    )
    parser.add_argument(
        "--images",
        required=True,
        help="folder of downloaded images; with --download-images, where they are downloaded to",
    )
    parser.add_argument(
        "--image-layout",
        choices=LAYOUTS,
        default="auto",
        help="indexed: <images>/<position>/<name>; flat: <images>/<shard>_images/<name>; "
        "url: <images> is an img2dataset output, images found by raw_url",
    )
    add_document_options(parser, "raw_url")
    parser.add_argument(
        "--schema-check",
        action="store_true",
        help="also re-validate every record with jsonschema (slower; the converter's own checks "
        "already enforce the schema)",
    )
    add_image_options(parser)
    add_run_options(parser)


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    return download_images_extra(args, "convert mmc4")


def run(args: argparse.Namespace) -> int:
    check_retry_failed(args)
    check_writable(args.out)
    options = Mmc4Options(
        images=args.images,
        layout=args.image_layout,
        keep_docs_without_images=args.keep_docs_without_images,
        drop_docs_with_missing_images=args.drop_docs_with_missing_images,
        policy=image_policy(args),
        schema_check=args.schema_check,
        download=images_download(args),
        retry_failed=args.retry_failed,
    )
    stats = convert_mmc4(
        args.docs,
        options,
        run_options(args, "mmc4"),
        overwrite=args.overwrite,
        execution=execution(args),
    )
    print_summary(stats, args)
    return 0
