"""``flamingo-data convert obelics``: OBELICS-style documents + images by url -> interleaved shards."""

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docs",
        required=True,
        nargs="+",
        help=".parquet, .jsonl, .jsonl.gz or .jsonl.zst document files: brace pattern, glob or folder",
    )
    parser.add_argument(
        "--images",
        required=True,
        help="img2dataset output the images are read from by url (the download target with "
        "--download-images)",
    )
    add_document_options(parser, "image url")
    add_image_options(parser)
    add_run_options(parser)


def required_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    return download_images_extra(args, "convert obelics")


def run(args: argparse.Namespace) -> int:
    from flamingo_data.converters.obelics import ObelicsOptions, convert_obelics
    from flamingo_data.fetch.url_images import UrlImages

    check_retry_failed(args)
    check_writable(args.out)
    options = ObelicsOptions(
        images=UrlImages(
            args.images, download=images_download(args), retry_failed=args.retry_failed
        ),
        keep_docs_without_images=args.keep_docs_without_images,
        drop_docs_with_missing_images=args.drop_docs_with_missing_images,
        policy=image_policy(args),
    )
    stats = convert_obelics(
        args.docs,
        options,
        run_options(args, "obelics"),
        overwrite=args.overwrite,
        execution=execution(args),
    )
    print_summary(stats, args)
    return 0
