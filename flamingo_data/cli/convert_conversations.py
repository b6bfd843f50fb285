"""``flamingo-data convert conversations``: LLaVA-style JSON + image folder -> shards."""

from __future__ import annotations

import argparse

from flamingo_data.cli.options import (
    add_image_options,
    add_run_options,
    check_writable,
    execution,
    image_policy,
    print_summary,
    run_options,
)
from flamingo_data.converters.conversations import (
    DEFAULT_SYSTEM_TEMPLATE,
    DEFAULT_TEMPLATE,
    REJECT_SYSTEM,
    ConversationOptions,
    convert_conversations,
    split_template,
)
from flamingo_data.converters.jsonchunks import DEFAULT_CHUNK_SIZE


def template_arg(text: str) -> str:
    """argparse type: a role template with ``{value}`` exactly once (else exit 2 with the reason)."""
    try:
        split_template(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def system_template_arg(text: str) -> str:
    """argparse type: ``reject``, or a template as ``template_arg`` takes it."""
    return text if text == REJECT_SYSTEM else template_arg(text)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", required=True, nargs="+", help="JSON array or JSONL files (patterns, folders)"
    )
    parser.add_argument(
        "--images", required=True, help="folder the items' image paths are relative to"
    )
    parser.add_argument(
        "--as",
        dest="as_",
        choices=("interleaved", "gpt"),
        default="interleaved",
        help="interleaved (MMC4 form, default) or gpt (placeholders exactly where the tags were)",
    )
    parser.add_argument(
        "--template",
        nargs=2,
        type=template_arg,
        metavar=("HUMAN", "GPT"),
        default=DEFAULT_TEMPLATE,
        help="how each role's turn is rendered (default: 'User: {value}' 'Assistant: {value}')",
    )
    parser.add_argument(
        "--system-template",
        type=system_template_arg,
        default=DEFAULT_SYSTEM_TEMPLATE,
        metavar="SYSTEM",
        help=f"how a system turn is rendered (default: {DEFAULT_SYSTEM_TEMPLATE!r}, the system"
        f" prompt as plain text); {REJECT_SYSTEM!r}: a system turn rejects its item (unknown_role)",
    )
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"items per unit of work, so one big file converts in parallel (default {DEFAULT_CHUNK_SIZE})",
    )
    add_image_options(parser)
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out)
    options = ConversationOptions(
        images=args.images,
        as_=args.as_,
        template=tuple(args.template),
        policy=image_policy(args),
        system_template=args.system_template,
    )
    stats = convert_conversations(
        args.json,
        options,
        run_options(args, "conversations"),
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        execution=execution(args),
    )
    print_summary(stats, args)
    return 0
