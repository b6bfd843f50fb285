"""Options and error handling shared by the subcommands."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from flamingo_data.core.stats import Stats
from flamingo_data.errors import UsageError
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.images.jpeg_encoders import (
    DEFAULT_ENCODER,
    DEFAULT_TABLES,
    ENCODERS,
    JPEG_TABLES,
)
from flamingo_data.images.stage import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    RESIZE_FILTERS,
    ImagePolicy,
)
from flamingo_data.run.executors import Execution, default_processes
from flamingo_data.run.outcome import DEFAULT_MAX_REJECT_SHARE, summary
from flamingo_data.run.units import RunOptions
from flamingo_data.storage import remote


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every converter shares: output, parallelism, resume, rejects, shard size."""
    parser.add_argument(
        "--out",
        required=True,
        type=remote.local_form,
        help="output folder for shards, sizes.json, stats.json",
    )
    add_processes_option(parser)
    parser.add_argument(
        "--resume", action="store_true", help="skip finished units, redo unfinished ones"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run's output first"
    )
    parser.add_argument(
        "--rejects",
        action="store_true",
        help="write rejects.jsonl: each rejected record, and each image not embedded (missing too) "
        "with its url and its document's fate",
    )
    add_reject_share_option(parser)
    add_unit_options(parser)
    add_progress_option(parser)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """The progress bar on stderr, on unless ``--no-progress``: the same in every subcommand."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_processes_option(parser: argparse.ArgumentParser) -> None:
    """``--processes`` means parallel units in every subcommand (img2dataset's own processes are
    ``--download-processes``)."""
    parser.add_argument(
        "--processes",
        type=positive,
        default=default_processes(),
        help="parallel units (default: cores)",
    )


def print_summary(
    stats: Stats, args: argparse.Namespace, records: str = "documents", read_from: str | None = None
) -> None:
    """The converters' end-of-run lines on stdout (``summary``)."""
    print("\n".join(summary(stats, args.out, records, read_from, rejects=args.rejects)))


def execution(args: argparse.Namespace) -> Execution:
    """Where and how the units run, from the shared options."""
    return Execution(
        executor=getattr(args, "executor", "local"),
        processes=args.processes,
        master=getattr(args, "executor_master", None),
        progress=not args.no_progress,
    )


def add_fetch_options(parser: argparse.ArgumentParser) -> None:
    """How img2dataset fetches urls: the same flags wherever a converter downloads."""
    parser.add_argument(
        "--download-processes", type=positive, default=1, help="img2dataset processes"
    )
    parser.add_argument(
        "--threads", type=positive, default=16, help="img2dataset threads per process"
    )
    parser.add_argument("--timeout", type=positive, default=10, help="seconds per download")
    parser.add_argument(
        "--retries", type=non_negative, default=1, help="extra tries per url (default 1)"
    )


def add_document_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The document converters' (MMC4, OBELICS) shared options: which documents are kept when
    images are missing, and fetching the images by url (``what``: the field holding it)."""
    parser.add_argument(
        "--keep-docs-without-images",
        action="store_true",
        help="write documents none of whose images were kept (default: drop)",
    )
    parser.add_argument(
        "--drop-docs-with-missing-images",
        action="store_true",
        help="drop documents with any image missing or refused (default: keep them without it)",
    )
    _add_download_images_options(parser, what)
    add_fetch_options(parser)


def _add_download_images_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--download-images`` and ``--retry-failed``."""
    parser.add_argument(
        "--download-images",
        action="store_true",
        help=f"first fetch each distinct http(s) {what} into --images with img2dataset (bounded, "
        "robots.txt and X-Robots-Tag opt-outs honoured; needs the [download] extra)",
    )
    parser.add_argument(
        "--retry-failed",
        type=reason_list,
        default=(),
        metavar="REASON[,REASON]",
        help="with --download-images: rerun the earlier run into --out, fetching again only the "
        "urls that failed with these reasons (e.g. timeout,http_5xx); implies --resume",
    )


def reason_list(text: str) -> tuple[str, ...]:
    """Comma-separated reason codes (``timeout,http_503``; ``http_5xx`` for every 5xx)."""
    reasons = tuple(r.strip() for r in text.split(",") if r.strip())
    if not reasons or not all(re.fullmatch(r"[a-z0-9_]+", r) for r in reasons):
        raise argparse.ArgumentTypeError(
            f"must be reason codes such as timeout,http_5xx, not {text!r}"
        )
    return reasons


def check_retry_failed(args: argparse.Namespace) -> None:
    """``--retry-failed`` needs ``--download-images`` and reruns the run in ``--out``."""
    if args.retry_failed and not args.download_images:
        raise UsageError("--retry-failed needs --download-images: only a download fetches again")
    if args.retry_failed:
        args.resume = True


def download_images_extra(args: argparse.Namespace, command: str) -> list[tuple[str, str]]:
    """A document converter needs img2dataset (the [download] extra) only to download."""
    return [("download", f"{command} --download-images")] if args.download_images else []


def images_download(args: argparse.Namespace) -> DownloadOptions | None:
    """How a document converter downloads its images, or None when it reads them only."""
    return download_options(args) if args.download_images else None


def download_options(args: argparse.Namespace) -> DownloadOptions:
    return DownloadOptions(
        processes=args.download_processes,
        threads=args.threads,
        timeout=args.timeout,
        retries=args.retries,
    )


def add_reject_share_option(parser: argparse.ArgumentParser) -> None:
    """Every converter: above this share of records not written, the run ends with a warning."""
    parser.add_argument(
        "--max-reject-share",
        type=share,
        default=DEFAULT_MAX_REJECT_SHARE,
        help="warn (one line, top reasons) when more than this share of the records is not "
        "written (default 0.5; 1 never warns). A run that writes nothing always fails (exit 1)",
    )


def share(text: str) -> float:
    """A share of the records, 0..1."""
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text}")
    return value


def add_unit_options(parser: argparse.ArgumentParser) -> None:
    """Where units run and how their shards are cut and committed (converters that write shards)."""
    add_executor_options(parser)
    parser.add_argument(
        "--max-samples-per-shard", type=positive, default=10_000, help="samples per shard at most"
    )
    parser.add_argument(
        "--max-bytes-per-shard",
        type=positive,
        default=2**30,
        help="bytes per shard file at most (a bigger sample gets a shard of its own)",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync on commit (scratch disks): faster, but a power loss can corrupt shards",
    )


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """Where units run (every converter)."""
    parser.add_argument(
        "--executor",
        choices=("local", "spark", "ray"),
        default="local",
        help="where units run: local process pool (default), spark, or ray (existing cluster)",
    )
    parser.add_argument(
        "--executor-master",
        default=None,
        help="spark master URL (default local[N], N = the parallel units) or ray address (default auto)",
    )


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """The image stage's policy: pixel cap (always on), optional resize, JPEG quality."""
    parser.add_argument(
        "--max-side", type=positive, default=None, help="downscale so the longer side is at most N"
    )
    parser.add_argument(
        "--short-side", type=positive, default=None, help="downscale so the shorter side is N"
    )
    parser.add_argument(
        "--quality",
        type=_quality,
        default=None,
        help="JPEG quality when re-encoding (default 90; with --short-side 70, which gives about a"
        " quarter of the baseline converter's bytes: pass 90 for a better picture, see the README)",
    )
    parser.add_argument(
        "--resize-filter",
        choices=tuple(RESIZE_FILTERS),
        default="bicubic",
        help="downscale filter (default bicubic; bilinear is ~20%% faster, see the README)",
    )
    parser.add_argument(
        "--encoder",
        choices=ENCODERS,
        default=DEFAULT_ENCODER,
        help="JPEG encoder for re-encoded images (default libjpeg-turbo; jpegli: ~11%% fewer bytes,"
        " needs the [jpegli] extra, see the README)",
    )
    parser.add_argument(
        "--jpeg-tables",
        choices=JPEG_TABLES,
        default=DEFAULT_TABLES,
        help="libjpeg-turbo's quantisation tables (default robidoux: ~20%% fewer bytes at the same"
        " picture quality; annex-k: libjpeg's own, which runs made before the change used)",
    )
    parser.add_argument(
        "--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, help="reject larger images"
    )
    parser.add_argument(
        "--max-image-bytes",
        type=positive,
        default=DEFAULT_MAX_BYTES,
        help="reject bigger image files unread (default 128 MiB)",
    )
    parser.add_argument(
        "--verify-images",
        choices=("structure", "decode"),
        default="structure",
        help="kept images: check header + end-of-stream markers (default) or fully decode each",
    )


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError("JPEG quality is 1..100")
    return value


def positive(text: str) -> int:
    """A size or pixel count, at least 1: 0 would be ignored and a negative one shrink images to 1 x 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def finite(text: str) -> float:
    """A float that is a number: ``nan`` passes every comparison, so a nan threshold kept or
    dropped images by accident, and ``inf`` is no threshold either."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def image_policy(args: argparse.Namespace) -> ImagePolicy:
    return ImagePolicy(
        max_pixels=args.max_pixels,
        max_bytes=args.max_image_bytes,
        max_side=args.max_side,
        short_side=args.short_side,
        quality=args.quality,
        verify=args.verify_images,
        resize_filter=args.resize_filter,
        encoder=args.encoder,
        jpeg_tables=args.jpeg_tables,
    )


def run_options(args: argparse.Namespace, converter: str) -> RunOptions:
    return RunOptions(
        out_dir=args.out,
        converter=converter,
        max_samples=args.max_samples_per_shard,
        max_bytes=args.max_bytes_per_shard,
        write_rejects=args.rejects,
        resume=args.resume,
        fsync=not args.no_fsync,
        max_reject_share=args.max_reject_share,
        progress=not args.no_progress,
    )


def check_writable(out_dir: str) -> None:
    """Fail early with one line when the output folder cannot be created or written."""
    if remote.is_remote(out_dir):
        return  # checked where it is written: object stores have no folder to test
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {out_dir} is not writable")
