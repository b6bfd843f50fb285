"""img2dataset as a library: Flamingo-ready settings, no telemetry, bounded timeouts, incremental resume.

img2dataset spawns processes, so its caller needs an ``if __name__ == "__main__":`` guard (the CLI has
one). albumentations, imported by img2dataset, calls PyPI on import unless told not to: we tell it.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flamingo_data.stats import Stats


@dataclass(frozen=True)
class DownloadOptions:
    image_size: int = 256
    resize_mode: str = "keep_ratio_largest"
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 1
    min_size: int = 0
    samples_per_shard: int = 10_000
    keep_original_bytes: bool = False


def run_img2dataset(
    url_list: str,
    output: str,
    *,
    url_col: str,
    caption_col: str | None,
    options: DownloadOptions,
    input_format: str = "parquet",
) -> None:
    """Download into ``output`` (webdataset jpg/txt/json); done shards are skipped on a rerun."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    download(
        url_list=url_list,
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
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
        compute_hash=None,
        incremental_mode="incremental",
        distributor="multiprocessing",
    )


def i2d_shards(folder: str | Path) -> list[Path]:
    """img2dataset's finished shards: a tar whose ``_stats.json`` exists (written last)."""
    folder = Path(folder)
    return sorted(t for t in folder.glob("*.tar") if (folder / f"{t.stem}_stats.json").exists())


def i2d_stats(folder: str | Path, stats: Stats) -> None:
    """Fold img2dataset's per-shard stats into ours: rows in, downloaded, failed by reason."""
    for path in sorted(Path(folder).glob("*_stats.json")):
        data = json.loads(path.read_text())
        stats.add("rows", "in", int(data.get("count", 0)))
        stats.add("rows", "downloaded", int(data.get("successes", 0)))
        for reason, count in data.get("status_dict", {}).items():
            if reason != "success":
                stats.reject("rows", reason[:120], int(count))


def i2d_failures(folder: str | Path) -> list[dict[str, Any]]:
    """Failed rows with their reasons, from img2dataset's per-shard parquet files."""
    rows = []
    for path in sorted(Path(folder).glob("*.parquet")):
        frame = pd.read_parquet(path)
        for row in frame[frame["status"] != "success"].itertuples():
            rows.append(
                {
                    "key": str(row.key),
                    "url": str(row.url),
                    "kind": "rows",
                    "reason": str(row.error_message or row.status),
                }
            )
    return rows


def read_tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of an img2dataset tar by key (small shards; used for joins by url)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or "/" in member.name or ".." in member.name:
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def url_index(folder: str | Path) -> dict[str, tuple[Path, str]]:
    """url -> (tar, key) for every successful download in an img2dataset output."""
    index = {}
    for tar in i2d_shards(folder):
        parquet = tar.with_suffix(".parquet")
        if not parquet.exists():
            continue
        frame = pd.read_parquet(parquet, columns=["url", "key", "status"])
        for row in frame[frame["status"] == "success"].itertuples():
            index.setdefault(str(row.url), (tar, str(row.key)))
    return index


class ImageStore:
    """Image bytes by url from an img2dataset output; opens each tar once."""

    def __init__(self, folder: str | Path) -> None:
        self.index = url_index(folder)
        self._cache: dict[Path, dict[str, dict[str, bytes]]] = {}

    def get(self, url: str) -> bytes | None:
        where = self.index.get(url)
        if where is None:
            return None
        tar, key = where
        if tar not in self._cache:
            self._cache[tar] = read_tar_members(tar)
        members = self._cache[tar].get(key, {})
        return next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
