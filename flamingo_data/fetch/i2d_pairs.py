"""Check one img2dataset pair shard sample by sample and place it in the output folder.

A shard whose every sample is fit for training is placed unchanged (hard link or copy: no re-encode,
byte-identical); otherwise it is rewritten without the bad samples, each counted with its reason
(and with NaN/±Infinity in ``<key>.json`` written as null: see ``finite_json``).
Runs in a worker process, so it returns plain data (``ShardResult``) for the driver to merge.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flamingo_data.core.schema import schema_errors
from flamingo_data.core.stats import Stats
from flamingo_data.images.stage import decode_rgb, sniff_format
from flamingo_data.storage.shard_reader import (
    DECODED_EXTS,
    IMAGE_EXTS,
    ReadIssue,
    Sample,
    iter_samples,
)
from flamingo_data.storage.shard_writer import ShardWriter

DRAFT_SIZE = 64  # JPEGs decode at reduced DCT scale: every byte of entropy data is still read


@dataclass
class ShardResult:
    """What became of one shard: ``how`` is linked | copied | rewritten | empty."""

    name: str
    written: int
    how: str
    stats: dict[str, Any]
    rejects: list[dict[str, Any]] = field(default_factory=list)


def check_sample(members: dict[str, bytes], max_pixels: int) -> str | None:
    """Why a downloaded sample is not fit for training, or None."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return "missing_image"
    if sniff_format(image) not in ("jpeg", "png", "webp"):
        return "not_an_image"
    try:
        decode_rgb(image, max_pixels, draft_size=DRAFT_SIZE)
    except ValueError as exc:
        return "too_many_pixels" if str(exc) == "too_many_pixels" else "undecodable_image"
    except Exception:  # PIL raises many types for corrupt data; all mean the same here
        return "undecodable_image"
    return _check_text(members)


def _check_text(members: dict[str, bytes]) -> str | None:
    if "txt" not in members:
        return "missing_caption"
    try:
        caption = members["txt"].decode("utf-8")
        orjson.loads(members["json"])  # validate's parser first: it refuses NaN, lone surrogates
        meta = json.loads(members["json"])
    except UnicodeDecodeError:
        return "caption_not_utf8"
    except (KeyError, ValueError):
        return "bad_json"
    if isinstance(meta, dict) and "caption" in meta and not isinstance(meta["caption"], str):
        return "missing_caption"  # null or NaN (img2dataset wrote "nan"), a number: no caption
    if not caption.strip():
        return "empty_caption"
    return "schema" if schema_errors("pair", meta) else None


def finite_json(raw: bytes) -> bytes | None:
    """``raw`` with NaN/±Infinity as null, when it has them, else None. img2dataset's
    ``json.dumps`` writes them from a float column (LAION's ``punsafe``), JSON has neither, and
    ``validate`` refuses the sample: the pair itself is fine, so the value goes, not the sample."""
    try:
        orjson.loads(raw)
        return None
    except orjson.JSONDecodeError:
        pass
    try:
        value = json.loads(raw, parse_constant=lambda name: None)
        fixed = json.dumps(value, indent=4).encode()  # img2dataset's layout
        orjson.loads(fixed)
    except (ValueError, RecursionError):  # not only NaN: check_sample says bad_json
        return None
    return fixed


def _url(sample: Sample) -> str:
    try:
        return str(json.loads(sample.members["json"]).get("url", ""))
    except (KeyError, ValueError, AttributeError):
        return ""


def scan_shard(
    tar: Path, max_pixels: int, stats: Stats, rejects: list
) -> tuple[set[str], dict[str, bytes], bool]:
    """(keys of bad samples, repaired ``<key>.json`` by key, whether the tar itself had problems);
    counts every sample."""
    bad: set[str] = set()
    repaired: dict[str, bytes] = {}
    issues: list[ReadIssue] = []
    for sample in iter_samples(str(tar), issues.append, read=DECODED_EXTS):
        stats.add("samples", "in")
        issues += _undocumented_members(sample)
        if "json" in sample.members and (fixed := finite_json(sample.members["json"])):
            sample.members["json"] = repaired[sample.key] = fixed
        if (reason := check_sample(sample.members, max_pixels)) is None:
            continue
        bad.add(sample.key)
        stats.reject("samples", reason)
        rejects.append(
            {"key": sample.key, "url": _url(sample), "kind": "samples", "reason": reason}
        )
    for issue in issues:
        stats.reject("members", issue.reason)
        entry = {"key": issue.key, "kind": "members", "reason": issue.reason}
        rejects.append({**entry, "shard": tar.name, "detail": issue.detail})
    if count := len(repaired.keys() - bad):
        stats.add("samples", "non_finite_to_null", count)
    return bad, repaired, bool(issues)


def _undocumented_members(sample: Sample) -> list[ReadIssue]:
    """A member a pair sample does not have (img2dataset's ``.pickle``, anything else): never
    read, dropped from the placed shard, so ``validate`` passes on it."""
    return [
        ReadIssue(sample.shard, sample.key, "unexpected_member", ext)
        for ext in sorted(set(sample.members) - DECODED_EXTS)
    ]


def place_shard(tar: Path, out: Path, max_pixels: int, how: str = "copy") -> ShardResult:
    """Check ``tar`` and put its good samples into ``out`` under the same name (``how``: link|copy)."""
    stats, rejects = Stats(converter="laion"), []
    bad, repaired, damaged = scan_shard(tar, max_pixels, stats, rejects)
    written = stats.get("samples", "in") - len(bad)
    stats.add("samples", "written", written)
    target = out / tar.name
    if written == 0:
        target.unlink(missing_ok=True)  # an earlier run's shard must not outlive its samples
        done = "empty"
    elif bad or repaired or damaged:
        _rewrite(tar, out, bad, repaired)
        done = "rewritten"
    else:
        done = _place_unchanged(tar, target, how)
    stats.add("shards", done)
    for sidecar in (tar.with_suffix(".parquet"), tar.with_name(f"{tar.stem}_stats.json")):
        if sidecar.exists() and written:
            shutil.copyfile(sidecar, out / sidecar.name)
    return ShardResult(tar.name, written, done, stats.to_json(), rejects)


def _place_unchanged(tar: Path, target: Path, how: str) -> str:
    """Hard-link (same file system) or copy, through a temporary name so a crash leaves no half shard."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if how == "link":
        try:
            os.link(tar, tmp)
            os.replace(tmp, target)
            return "linked"
        except OSError:  # another file system, or links not allowed: copy instead
            tmp.unlink(missing_ok=True)
    shutil.copyfile(tar, tmp)
    os.replace(tmp, target)
    return "copied"


def _rewrite(tar: Path, out: Path, bad: set[str], repaired: dict[str, bytes]) -> None:
    writer = ShardWriter(out, f"{tar.stem}_rewrite", max_samples=2**62, max_bytes=2**62)
    for sample in iter_samples(str(tar), lambda issue: None, read=DECODED_EXTS):
        for ext in set(sample.members) - DECODED_EXTS:
            del sample.members[ext]
        if sample.key not in bad and sample.members:
            if sample.key in repaired:
                sample.members["json"] = repaired[sample.key]
            writer.write(sample.key, sample.members)
    for name in writer.close():
        os.replace(out / name, out / tar.name)
