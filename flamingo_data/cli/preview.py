"""``flamingo-data preview``: an HTML page of documents as the loader will train on them."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path

from flamingo_data.cli.options import finite, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shards: brace patterns, globs or folders")
    parser.add_argument("--n", type=positive, default=20, help="documents to render (default 20)")
    parser.add_argument(
        "--key", action="append", default=None, help="render only these keys (repeatable)"
    )
    parser.add_argument("--out", default="preview.html", help="the HTML page to write")
    parser.add_argument(
        "--threshold",
        type=finite,
        default=0.24,
        help="similarity under which the loader drops an image",
    )
    parser.add_argument(
        "--max-images", type=positive, default=6, help="images per document the loader keeps"
    )
    parser.add_argument("--open", action="store_true", help="open the page in a browser")


def run(args: argparse.Namespace) -> int:
    from flamingo_data.check.preview import write_preview
    from flamingo_data.cli.validate import printable
    from flamingo_data.loader.config import LoaderConfig

    config = LoaderConfig(sim_threshold=args.threshold, max_images=args.max_images)
    result = write_preview(args.shards, args.out, n=args.n, keys=args.key, config=config)
    for issue in result.shard_issues:
        line = f"flamingo-data: warning: {issue.shard}: {issue.reason} {issue.detail}".rstrip()
        print(printable(line), file=sys.stderr)
    print(f"wrote {result.documents} documents ({result.images_shown} images) to {result.path}")
    if args.open:
        webbrowser.open(Path(result.path).resolve().as_uri())
    return 0
