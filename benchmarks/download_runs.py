"""One download in its own process, for bench_download.py to time and to charge CPU to.

``img2dataset``: img2dataset's own ``download`` (webdataset output, bytes stored as fetched).
``flamingo-data``: ``fetch_url_images`` (each distinct url once, bounded fetches, opt-out checks,
a per-url journal).
Both read the same parquet url list and use the same processes, threads, timeout, retries, shard
size and opt-out directives. img2dataset's spawned workers import this module as their main one,
so it imports only the standard library at the top.
Usage: python download_runs.py {img2dataset,flamingo-data} URLS.parquet OUT --processes 2 ...
"""

from __future__ import annotations

import argparse
import os


def img2dataset_download(args: argparse.Namespace) -> None:
    from img2dataset import download

    download(
        url_list=args.urls,
        input_format="parquet",
        url_col="url",
        output_format="webdataset",
        output_folder=args.out,
        processes_count=args.processes,
        thread_count=args.threads,
        resize_mode="no",
        disable_all_reencoding=True,
        timeout=args.timeout,
        retries=args.retries,
        number_sample_per_shard=args.per_shard,
        compute_hash=None,
        enable_wandb=False,
        distributor="multiprocessing",
        user_agent_token="img2dataset",
        disallowed_header_directives=args.opt_out.split(","),
    )


def flamingo_download(args: argparse.Namespace) -> None:
    import pandas as pd

    from flamingo_data.fetch.i2d_run import OPT_OUT_DIRECTIVES, DownloadOptions
    from flamingo_data.fetch.url_images import UrlImages, fetch_url_images

    assert args.opt_out.split(",") == OPT_OUT_DIRECTIVES, "both runs honour the same opt-outs"
    options = DownloadOptions(
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        retries=args.retries,
        samples_per_shard=args.per_shard,
    )
    urls = pd.read_parquet(args.urls)["url"].tolist()
    fetch_url_images(urls, UrlImages(args.out, download=options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=("img2dataset", "flamingo-data"))
    parser.add_argument("urls")
    parser.add_argument("out")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--timeout", type=int, required=True)
    parser.add_argument("--retries", type=int, required=True)
    parser.add_argument("--per-shard", type=int, required=True)
    parser.add_argument("--opt-out", required=True, help="X-Robots-Tag directives, comma-separated")
    args = parser.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # else albumentations asks PyPI on import
    os.environ["WANDB_MODE"] = "disabled"
    (img2dataset_download if args.tool == "img2dataset" else flamingo_download)(args)


if __name__ == "__main__":
    main()
