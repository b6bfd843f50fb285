"""Reading an img2dataset webdataset output: finished shards, every row's outcome, images by url.

img2dataset writes per shard ``<n>.tar``, ``<n>.parquet`` (one row per input row, with ``status`` and
``error_message``) and, last, ``<n>_stats.json``; a shard is finished once that file exists. Its error
messages are free text ("HTTP Error 404: Not Found", "<urlopen error timed out>", ...), so counts use a
stable reason code and the message itself goes to ``rejects.jsonl`` as detail.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_data.core.stats import Stats
from flamingo_data.run.units import RunIncomplete
from flamingo_data.storage import remote
from flamingo_data.storage.safe_tar import open_tar
from flamingo_data.storage.shard_reader import IMAGE_EXTS, split_key, unsafe_member_name
from flamingo_data.storage.specs import SpecError

DROPPED = "dropped_by_img2dataset"  # a row in no output file: see _dropped_rows

# (lower-case fragment of img2dataset's message, our reason code), first match wins
REASON_CODES = (
    ("timed out", "timeout"),
    ("image decoding error", "image_decoding_error"),
    ("image too small", "image_too_small"),
    ("image area too large", "too_many_pixels"),
    ("aspect ratio too large", "aspect_ratio_too_large"),
    ("x-robots-tag", "opted_out"),
    ("disallowed by robots.txt", "opted_out"),
    ("name or service not known", "dns_error"),
    ("name resolution", "dns_error"),
    ("connection refused", "connection_refused"),
    ("certificate", "ssl_error"),
    ("ssl", "ssl_error"),
    ("remote end closed", "connection_closed"),
    ("connection reset", "connection_closed"),
    ("unknown url type", "bad_url"),
    ("redirect to a non-http(s) url", "bad_url"),
    ("refused a non-http(s) url", "bad_url"),
    ("over the download cap", "too_many_bytes"),
    ("no host given", "bad_url"),
)


# The per-row columns every reader here needs, and the arrow types they may have.
ROW_COLUMNS = ("key", "url", "status", "error_message")
# _stats.json fields read here, and the JSON types they must have.
STATS_FIELDS = {"count": int, "successes": int, "status_dict": dict}


class Img2datasetOutputError(SpecError):
    """An img2dataset output whose sidecar (``<n>.parquet``, ``<n>_stats.json``) is missing a
    column or field, has a wrong type, or cannot be read: bad input, one line naming the file."""


def read_rows(parquet: Path) -> pd.DataFrame:
    """``ROW_COLUMNS`` of one shard's parquet, each as text (or null); raises
    ``Img2datasetOutputError`` when the file cannot be read or lacks one of them."""
    try:
        schema = pq.read_schema(parquet)
    except (pa.ArrowException, OSError) as exc:
        raise Img2datasetOutputError(f"{parquet} is not a readable parquet file: {exc}") from exc
    if missing := [c for c in ROW_COLUMNS if c not in schema.names]:
        raise Img2datasetOutputError(
            f"{parquet} lacks img2dataset's column(s) {', '.join(missing)}: not an img2dataset output"
        )
    if bad := [c for c in ROW_COLUMNS if not _is_text_like(schema.field(c).type)]:
        kinds = ", ".join(f"{c} is {schema.field(c).type}" for c in bad)
        raise Img2datasetOutputError(f"{parquet}: {kinds}, img2dataset writes text")
    try:
        table = pq.read_table(parquet, columns=list(ROW_COLUMNS))
    except (pa.ArrowException, OSError) as exc:
        raise Img2datasetOutputError(f"{parquet} is not a readable parquet file: {exc}") from exc
    frame = pd.DataFrame({c: table[c].cast(pa.string()).to_pylist() for c in ROW_COLUMNS})
    if frame["key"].isna().any():
        raise Img2datasetOutputError(f"{parquet}: a row has no key")
    return frame


def _is_text_like(kind: pa.DataType) -> bool:
    """Text, or nothing at all (a column of nulls is written as ``null``)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def read_stats_file(path: Path) -> dict[str, Any]:
    """One shard's ``_stats.json`` with ``STATS_FIELDS`` checked (absent ones default to 0 / {});
    raises ``Img2datasetOutputError`` when it is not such a JSON object."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise Img2datasetOutputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise Img2datasetOutputError(f"{path} is not JSON (cut off?): {exc}") from exc
    if not isinstance(data, dict):
        raise Img2datasetOutputError(f"{path} holds {type(data).__name__}, not a JSON object")
    for name, kind in STATS_FIELDS.items():
        value = data.setdefault(name, kind())
        if not isinstance(value, kind) or isinstance(value, bool) or _negative(value):
            raise Img2datasetOutputError(
                f"{path}: {name} is {json.dumps(value)[:80]}, not a {_JSON_NAMES[kind]}"
            )
    counts = data["status_dict"].values()
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise Img2datasetOutputError(f"{path}: status_dict counts must be non-negative integers")
    return data


_JSON_NAMES = {int: "non-negative integer", dict: "JSON object"}


def _negative(value: Any) -> bool:
    return isinstance(value, int) and value < 0


def check_sidecars(folder: str | Path) -> None:
    """Read every finished shard's sidecars once, so a broken one stops the run before any work
    (``Img2datasetOutputError``) instead of failing halfway through."""
    for tar in finished_shards(folder):
        read_stats_file(tar.with_name(f"{tar.stem}_stats.json"))
        if (parquet := tar.with_suffix(".parquet")).exists():
            read_rows(parquet)


def require_output(folder: str | Path, name: str, hint: str = "") -> None:
    """``folder``, given as parameter ``name``, must be an img2dataset output with a finished shard
    and readable sidecars: a mistyped folder would otherwise drop every item as not_downloaded and
    exit 0. Raises SpecError (``Img2datasetOutputError`` for a broken sidecar); ``hint`` follows."""
    if not finished_shards(folder):
        raise SpecError(
            f"no finished img2dataset shard (tar + _stats.json) in `{name}` {folder}{hint}"
        )
    check_sidecars(folder)


def finished_shards(folder: str | Path) -> list[Path]:
    """img2dataset's finished shards: a tar file whose ``_stats.json`` exists (written last)."""
    folder = Path(folder)
    return sorted(
        t
        for t in folder.glob("*.tar")
        if t.is_file() and (folder / f"{t.stem}_stats.json").exists()
    )


def check_finished(staging: Path, expected: int) -> None:
    """img2dataset only prints that a shard failed (a write error, a full disk) and returns: its
    rows would be missing from every count. Stop instead; --resume downloads just those shards."""
    done = {int(tar.stem) for tar in finished_shards(staging)}
    if missing := [f"{n:05d}" for n in range(expected) if n not in done]:
        raise RunIncomplete(
            f"img2dataset did not finish shard(s) {', '.join(missing)} in {staging} "
            "(its log above says why)"
        )


def failure_reason(message: Any, status: str) -> str:
    """A stable reason code for one of img2dataset's error messages."""
    text = str(message or "").lower()
    if text.startswith("robots.txt unreachable"):  # its own cause (a 503, a timeout) follows
        return "robots_unreachable"
    if match := re.search(r"http error (\d{3})", text):
        return f"http_{match.group(1)}"
    return next((code for fragment, code in REASON_CODES if fragment in text), status)


def shard_rows(
    tar: Path, stats: Stats, samples_per_shard: int | None = None
) -> list[dict[str, Any]]:
    """Count every input row of one finished shard (``rows``: in, downloaded, rejected by reason).

    Returns one reject entry (key, url, reason, detail) per failed row. Counts come from the per-row
    parquet file rather than ``_stats.json``, whose capped counter can drop rare messages; rows
    missing from the parquet are counted from ``_stats.json`` (see ``_dropped_rows``).
    ``samples_per_shard`` (when known) names the keys of a shard that lost every row.
    """
    parquet = tar.with_suffix(".parquet")
    if not parquet.exists():
        _rows_from_stats_file(tar.with_name(f"{tar.stem}_stats.json"), stats)
        return []
    frame = read_rows(parquet)
    rejects = _dropped_rows(tar, [str(k) for k in frame["key"]], stats, samples_per_shard)
    ok = frame["status"] == "success"
    stats.add("rows", "in", len(frame))
    stats.add("rows", "downloaded", int(ok.sum()))
    for row in frame[~ok].itertuples():
        reason = failure_reason(row.error_message, str(row.status))
        stats.reject("rows", reason)
        rejects.append(
            {
                "key": str(row.key),
                "url": str(row.url),
                "kind": "rows",
                "reason": reason,
                "detail": str(row.error_message or row.status)[:500],
            }
        )
    return rejects


def _dropped_rows(
    tar: Path, keys: list[str], stats: Stats, samples_per_shard: int | None
) -> list[dict[str, Any]]:
    """Rows img2dataset counted (``_stats.json`` ``count``) but wrote to neither tar nor parquet:
    an error while writing a sample (say, a column value json cannot encode) is only printed
    there. Counted as ``dropped_by_img2dataset``, with the row's key where it can be derived."""
    count = read_stats_file(tar.with_name(f"{tar.stem}_stats.json"))["count"]
    if count <= len(keys):
        return []
    stats.add("rows", "in", count - len(keys))
    stats.reject("rows", DROPPED, count - len(keys))
    stem = tar.stem
    digits = len(keys[0]) - len(stem) if keys else None
    if digits is None and samples_per_shard:
        digits = math.ceil(math.log10(samples_per_shard))
    present = {int(k[len(stem) :] or 0) for k in keys}
    detail = "img2dataset logged an error writing this row and kept no record of it"
    return [
        {
            "key": f"{stem}{row:0{digits}d}" if digits is not None else "",
            "shard": tar.name,
            "row": row,
            "kind": "rows",
            "reason": DROPPED,
            "detail": detail,
        }
        for row in range(count)
        if row not in present
    ]


def _rows_from_stats_file(path: Path, stats: Stats) -> None:
    """Fallback for an output copied without its parquet files: img2dataset's own counts."""
    data = read_stats_file(path)
    stats.add("rows", "in", data["count"])
    stats.add("rows", "downloaded", data["successes"])
    for message, count in data["status_dict"].items():
        if message != "success":
            stats.reject("rows", failure_reason(message, "failed"), int(count))


def member_offsets(tar_path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {ext: (offset, size)}}`` for the safe regular members of an uncompressed tar; a
    sparse member's bytes are not where its header says (its holes are not stored), so none."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    with remote.open_binary(str(tar_path)) as handle, open_tar(handle, "r:") as tar:
        for member in tar:
            if member.isfile() and not member.issparse() and not unsafe_member_name(member.name):
                key, ext = split_key(member.name)
                index.setdefault(key, {})[ext] = (member.offset_data, member.size)
    return index


class ImageStore:
    """Image bytes by url from an img2dataset output, read on demand (nothing large is held).

    ``get`` also says why a url has no image: img2dataset's reason code, or ``not_downloaded`` when
    the output never saw the url.
    """

    def __init__(self, folder: str | Path) -> None:
        self.found: dict[str, tuple[Path, int, int]] = {}
        self.failed: dict[str, str] = {}
        for tar in finished_shards(folder):
            parquet = tar.with_suffix(".parquet")
            if parquet.exists():
                self._index_shard(tar, parquet)

    def _index_shard(self, tar: Path, parquet: Path) -> None:
        frame = read_rows(parquet)
        offsets = member_offsets(tar)
        for row in frame.itertuples():
            url = str(row.url)
            members = offsets.get(str(row.key), {})
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if row.status == "success" and image is not None:
                self.found.setdefault(url, (tar, *image))
            elif row.status != "success":
                self.failed.setdefault(url, failure_reason(row.error_message, str(row.status)))

    def get(self, url: str, limit: int | None = None) -> tuple[bytes | None, str]:
        """(bytes, "") or (None, reason); at most ``limit`` bytes are read (an output from
        elsewhere may hold a member of any size; a bigger one is refused unread)."""
        where = self.found.get(url)
        if where is None:
            return None, self.failed.get(url, "not_downloaded")
        tar, offset, size = where
        with remote.open_binary(str(tar)) as handle:
            handle.seek(offset)
            return handle.read(size if limit is None else min(size, limit)), ""
