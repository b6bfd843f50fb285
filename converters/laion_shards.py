"""Check one img2dataset pair shard sample by sample and place it in the output folder.

Each image goes through the image stage (``ImagePolicy``: caps, keep or convert, resize). A shard
whose every sample is fit for training and whose images the stage keeps as they are is placed
unchanged (hard link or copy: byte-identical); otherwise it is rewritten with the stage's images and
without the bad samples, each counted with its reason (and with NaN/±Infinity in ``<key>.json``
written as null: see ``finite_json``). Runs in a unit's worker; returns plain data (``ShardResult``).
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
from flamingo_data.images.stage import ImagePolicy, decode_rgb, process_image
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


# The image stage's reasons under the names LAION's sample checks give them.
SAMPLE_REASONS = {
    "undecodable": "undecodable_image",
    "truncated": "undecodable_image",
    "empty": "not_an_image",
}
MEMBER_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass(frozen=True)
class Verdict:
    """Why a sample is not fit for training (``reason``), or the image member it is written with
    when the stage changed it (``image``: ext and bytes; None: the sample's own)."""

    reason: str | None = None
    image: tuple[str, bytes] | None = None


def check_sample(members: dict[str, bytes], policy: ImagePolicy) -> Verdict:
    """The image through the stage first, then the caption and metadata."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        return Verdict("missing_image")
    result = process_image(members[ext], policy)
    if not result.ok:
        return Verdict(SAMPLE_REASONS.get(result.reason, result.reason))
    unchanged = result.outcome == "kept" and MEMBER_EXT.get(result.fmt) == ext.replace(
        "jpeg", "jpg"
    )
    if result.outcome == "kept" and not _decodes(result.data, policy.max_pixels):
        return Verdict("undecodable_image")  # the stage checks a kept image's structure only
    if (reason := _check_text(members)) is not None:
        return Verdict(reason)
    return Verdict(image=None if unchanged else (MEMBER_EXT.get(result.fmt, "jpg"), result.data))


def _decodes(image: bytes, max_pixels: int) -> bool:
    """Every byte of entropy data decodes (JPEGs at reduced DCT scale)."""
    try:
        decode_rgb(image, max_pixels, draft_size=DRAFT_SIZE)
    except Exception:  # PIL raises many types for corrupt data; all mean the same here
        return False
    return True


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


def write_checked(
    tar: Path, policy: ImagePolicy, writer: ShardWriter, stats: Stats, rejects: list
) -> bool:
    """Write every fit sample of ``tar`` (its image as the stage gives it) into ``writer``; count
    every sample. Returns whether the written shard differs from ``tar`` (a sample left out or
    changed, or a problem in the tar itself)."""
    issues: list[ReadIssue] = []
    changed = repaired = 0
    for sample in iter_samples(str(tar), issues.append, read=DECODED_EXTS):
        stats.add("samples", "in")
        issues += _undocumented_members(sample)
        members = {ext: data for ext, data in sample.members.items() if ext in DECODED_EXTS}
        if "json" in members and (fixed := finite_json(members["json"])):
            members["json"] = fixed
        verdict = check_sample(members, policy)
        if verdict.reason is not None:
            changed += 1
            stats.reject("samples", verdict.reason)
            entry = {"key": sample.key, "url": _url(sample), "kind": "samples"}
            rejects.append({**entry, "reason": verdict.reason})
            continue
        repaired += members.get("json") is not sample.members.get("json")
        if verdict.image is not None:
            changed += 1
            members = {e: d for e, d in members.items() if e not in IMAGE_EXTS}
            members[verdict.image[0]] = verdict.image[1]
        writer.write(sample.key, members)
        stats.add("samples", "written")
    for issue in issues:
        stats.reject("members", issue.reason)
        entry = {"key": issue.key, "kind": "members", "reason": issue.reason}
        rejects.append({**entry, "shard": tar.name, "detail": issue.detail})
    if repaired:
        stats.add("samples", "non_finite_to_null", repaired)
    return bool(changed or repaired or issues)


def _undocumented_members(sample: Sample) -> list[ReadIssue]:
    """A member a pair sample does not have (img2dataset's ``.pickle``, anything else): never
    read, dropped from the placed shard, so ``validate`` passes on it."""
    return [
        ReadIssue(sample.shard, sample.key, "unexpected_member", ext)
        for ext in sorted(set(sample.members) - DECODED_EXTS)
    ]


def place_shard(tar: Path, out: Path, policy: ImagePolicy, how: str = "copy") -> ShardResult:
    """Check ``tar`` and put its fit samples into ``out`` under the same name (``how``:
    link|copy when nothing changed; rewritten otherwise)."""
    stats, rejects = Stats(converter="laion"), []
    writer = ShardWriter(out, f"{tar.stem}_rewrite", max_samples=2**62, max_bytes=2**62)
    try:
        changed = write_checked(tar, policy, writer, stats, rejects)
    except BaseException:
        writer.abort()
        raise
    written = stats.get("samples", "written")
    target = out / tar.name
    if written == 0:
        writer.abort()
        target.unlink(missing_ok=True)  # an earlier run's shard must not outlive its samples
        done = "empty"
    elif changed:
        for name in writer.close():
            os.replace(out / name, target)
        done = "rewritten"
    else:
        writer.abort()
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
