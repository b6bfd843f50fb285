"""LAION-style parquet -> image-text pair shards, downloaded by img2dataset and then checked by us.

img2dataset downloads into ``<out>/_download`` (its incremental mode is the resume). Each finished
shard is checked sample by sample (image sniffs and its header is within the pixel cap, caption is
UTF-8, metadata passes the pair schema), then copied unchanged into ``<out>`` — or, if any sample
fails, rewritten without it (counted with the reason). ``sizes.json``/``stats.json``/``rejects.jsonl``
go beside the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from flamingo_data.download import (
    DownloadOptions,
    i2d_failures,
    i2d_shards,
    i2d_stats,
    read_tar_members,
    run_img2dataset,
)
from flamingo_data.images import DEFAULT_MAX_PIXELS, open_capped, sniff_format
from flamingo_data.schema import schema_errors
from flamingo_data.shards import ShardWriter, write_atomic
from flamingo_data.specs import SpecError, expand_specs
from flamingo_data.stats import Stats
from flamingo_data.units import prepare_out_dir

URL_NAMES = ("url", "image_url", "link", "img_url")
CAPTION_NAMES = ("text", "caption", "title", "alt", "alt_text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class LaionOptions:
    url_col: str | None = None
    caption_col: str | None = None
    download: DownloadOptions = field(default_factory=DownloadOptions)
    max_pixels: int = DEFAULT_MAX_PIXELS


def detect_columns(parquet: str, url_col: str | None, caption_col: str | None) -> tuple[str, str]:
    """The url and caption columns: as given, or by common names (case-insensitive)."""
    columns = pq.read_schema(parquet).names
    lower = {c.lower(): c for c in columns}
    url = url_col or next((lower[n] for n in URL_NAMES if n in lower), None)
    caption = caption_col or next((lower[n] for n in CAPTION_NAMES if n in lower), None)
    missing = [
        name
        for name, col in (("url", url), ("caption", caption))
        if col is None or col not in columns
    ]
    if missing:
        raise SpecError(
            f"cannot find the {' and '.join(missing)} column in {parquet}; its columns are: "
            f"{', '.join(columns)} (use --url-col / --caption-col)"
        )
    return url, caption


def check_sample(key: str, members: dict[str, bytes], max_pixels: int) -> str | None:
    """Why a downloaded sample is not fit for training, or None."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return "missing_image"
    if sniff_format(image) not in ("jpeg", "png", "webp"):
        return "not_an_image"
    try:
        open_capped(image, max_pixels)
    except ValueError:
        return "too_many_pixels"
    except Exception:
        return "undecodable"
    try:
        members["txt"].decode("utf-8")
        meta = json.loads(members["json"])
    except (KeyError, UnicodeDecodeError, ValueError):
        return "bad_caption_or_metadata"
    return "schema" if schema_errors("pair", meta) else None


def adopt_shard(
    tar: Path, out: Path, stats: Stats, rejects: list[dict[str, Any]], max_pixels: int
) -> tuple[str, int]:
    """Check one img2dataset shard and place it in ``out``; returns (shard name, good samples)."""
    samples = read_tar_members(tar)
    bad = {}
    for key, members in samples.items():
        stats.add("samples", "in")
        if (reason := check_sample(key, members, max_pixels)) is not None:
            bad[key] = reason
            stats.reject("samples", reason)
            rejects.append({"key": key, "kind": "samples", "reason": reason})
    stats.add("samples", "written", len(samples) - len(bad))
    target = out / tar.name
    if not bad:
        shutil.copyfile(tar, str(target) + ".tmp")
        os.replace(str(target) + ".tmp", target)
    else:
        _rewrite(tar, out, {k: v for k, v in samples.items() if k not in bad})
    for sidecar in (tar.with_suffix(".parquet"), tar.with_name(f"{tar.stem}_stats.json")):
        if sidecar.exists():
            shutil.copyfile(sidecar, out / sidecar.name)
    return tar.name, len(samples) - len(bad)


def _rewrite(tar: Path, out: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(tar) as source:
        order = list(dict.fromkeys(m.name.partition(".")[0] for m in source))
    writer = ShardWriter(out, tar.stem + "_rewrite", max_samples=len(samples) + 1)
    for key in order:
        if key in samples:
            writer.write(key, samples[key])
    for name in writer.close():
        os.replace(out / name, out / tar.name)


def convert_laion(
    parquet: str | list[str] | None,
    out: str,
    options: LaionOptions,
    *,
    from_img2dataset: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    write_rejects: bool = False,
) -> Stats:
    """Download (or adopt) then check; returns merged stats."""
    root = prepare_out_dir(out, resume, overwrite)
    staging = Path(from_img2dataset) if from_img2dataset else root / "_download"
    if from_img2dataset is None:
        _download(parquet, root, staging, options)
    elif not i2d_shards(staging):
        raise SpecError(f"no finished img2dataset shard (tar + _stats.json) in {from_img2dataset}")
    stats, rejects, sizes = Stats(converter="laion"), i2d_failures(staging), {}
    i2d_stats(staging, stats)
    for tar in i2d_shards(staging):
        name, count = adopt_shard(tar, root, stats, rejects, options.max_pixels)
        sizes[name] = count
    stats.add("shards", "written", len(sizes))
    write_atomic(root / "sizes.json", json.dumps(sizes, indent=1).encode())
    write_atomic(root / "stats.json", json.dumps(stats.to_json(), indent=1).encode())
    if write_rejects:
        write_atomic(
            root / "rejects.jsonl",
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects).encode(),
        )
    return stats


def _download(parquet, root: Path, staging: Path, options: LaionOptions) -> None:
    sources = expand_specs(parquet, folder_suffix=".parquet") if parquet else []
    if not sources:
        raise SpecError(f"no parquet file matches {parquet!r}")
    url_col, caption_col = detect_columns(sources[0], options.url_col, options.caption_col)
    url_list = sources[0]
    if (
        len(sources) > 1
    ):  # img2dataset takes one file or one folder: link the inputs into a folder, in order
        inputs = root / "_inputs"
        inputs.mkdir(exist_ok=True)
        for i, source in enumerate(sources):
            link = inputs / f"{i:05d}.parquet"
            if not link.exists():
                link.symlink_to(Path(source).resolve())
        url_list = str(inputs)
    run_img2dataset(
        url_list, str(staging), url_col=url_col, caption_col=caption_col, options=options.download
    )
