"""img2dataset as a library: Flamingo-ready settings, no telemetry, bounded timeouts, incremental resume.

img2dataset spawns processes, so its caller needs an ``if __name__ == "__main__":`` guard (the CLI has
one). albumentations, imported by img2dataset, calls PyPI on import unless told not to: we tell it, and
import img2dataset only when a download really starts. Ray is never started: the ``multiprocessing``
distributor runs everything on this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flamingo_data.images import DEFAULT_MAX_PIXELS

# Directives with which a site asks that its images not be used for AI training or indexing.
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


def is_web_url(url: str) -> bool:
    """Only http(s) is fetched: img2dataset's urllib would also read ``file://`` urls, so a crafted
    dataset could copy the converting machine's own files into shards."""
    return url[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class DownloadOptions:
    """How img2dataset fetches: sizes, parallelism, bounded timeouts/retries, pixel cap, opt-outs."""

    image_size: int = 256
    resize_mode: str = "keep_ratio_largest"
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 1
    min_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    samples_per_shard: int = 10_000
    keep_original_bytes: bool = False
    respect_opt_out: bool = True


def run_img2dataset(
    url_list: str,
    output: str,
    *,
    url_col: str,
    caption_col: str | None,
    options: DownloadOptions,
    extra_columns: list[str] | None = None,
    input_format: str = "parquet",
) -> None:
    """Download into ``output`` (webdataset jpg/txt/json); finished shards are skipped on a rerun."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    download(
        url_list=url_list,
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra_columns or None,
        output_format="webdataset",
        output_folder=output,
        processes_count=options.processes,
        thread_count=options.threads,
        image_size=options.image_size,
        resize_mode="no" if options.keep_original_bytes else options.resize_mode,
        resize_only_if_bigger=True,
        disable_all_reencoding=options.keep_original_bytes,
        timeout=options.timeout,
        retries=options.retries,
        enable_wandb=False,
        number_sample_per_shard=options.samples_per_shard,
        min_image_size=options.min_size,
        max_image_area=options.max_pixels,
        compute_hash=None,
        incremental_mode="incremental",
        distributor="multiprocessing",
        user_agent_token="img2dataset" if options.respect_opt_out else None,
        disallowed_header_directives=OPT_OUT_DIRECTIVES if options.respect_opt_out else None,
    )
