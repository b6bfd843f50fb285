"""MMC4 document files + downloaded images -> interleaved (MMC4-form) shards with embedded base64
images.

One unit per document file: a zip of jsonl members, or one ``.jsonl``, ``.jsonl.gz`` or
``.jsonl.zst`` file. Each jsonl line becomes one record keyed ``<unit>-<line>`` or a counted,
reasoned reject. Image layouts: ``indexed`` (``<images>/<shard number in the zip's name>/<name>``,
or the zip's position in a brace pattern when its name has none) and ``flat`` (``<images>/<shard>_images/<name>``); ``auto`` picks the one where images are found
and fails loudly when nearly every image is missing under both.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from flamingo_data.converters.docstreams import (
    SUFFIXES,
    CorruptStream,
    InflationBomb,
    StreamError,
    TruncatedStream,
    kind_of,
    open_documents,
)
from flamingo_data.core.records import (
    ImageInfo,
    InterleavedDoc,
    RecordEncodingError,
    encode_record,
)
from flamingo_data.core.schema import schema_errors
from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError, LayoutError
from flamingo_data.fetch.web import is_web_url
from flamingo_data.images.stage import ImagePolicy, process_image
from flamingo_data.run.driver import ConversionPlan, run_conversion
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions, Unit, UnitContext, unit_names
from flamingo_data.storage import remote
from flamingo_data.storage.shard_writer import safe_stem
from flamingo_data.storage.specs import (
    SpecError,
    expand_specs,
    lists_folder_or_glob,
    missing_folder,
)

if TYPE_CHECKING:  # pandas and pyarrow load only when images are read by url
    from flamingo_data.converters.downloads import DownloadStep
    from flamingo_data.fetch.i2d_run import DownloadOptions
    from flamingo_data.fetch.url_images import UrlStore

LAYOUTS = ("auto", "indexed", "flat", "url")
# A document line longer than this is counted line_too_long and never held whole: MMC4 lines are
# kilobytes (a few MB at most), while a zip bomb's one line took 4x its size to read and parse.
MAX_LINE_BYTES = 64 * 2**20
# A zip whose jsonl members inflate past BOMB_MIN_BYTES at over MAX_INFLATION times their compressed
# size is refused unread (compression_bomb): MMC4 jsonl deflates a few times, a bomb of blank or
# tiny lines about a thousand times.
BOMB_MIN_BYTES = 8 * 2**20
MAX_INFLATION = 100
READ_BLOCK = 2**20  # members are read in blocks of this size
SPACE_BYTES = b" \t\n\r\x0b\x0c"  # what bytes.strip() removes
_NON_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c]")
# How many zips, evenly spaced in the --docs list, auto-detection samples image names from.
SAMPLE_UNITS = 20
# What reading a bad zip raises; RuntimeError: an encrypted member, NotImplementedError (a
# RuntimeError too): an unsupported compression method.
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError)


class CutOffZipError(zipfile.BadZipFile):
    """The file starts as a zip does but its end (the central directory) is missing."""


@dataclass(frozen=True, slots=True)
class Mmc4Options:
    """What to read and what to keep."""

    images: str
    layout: str = "auto"
    keep_docs_without_images: bool = False
    drop_docs_with_missing_images: bool = False
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    min_found_rate: float = 0.05
    schema_check: bool = (
        False  # parse_document already enforces the schema; this re-checks with jsonschema
    )
    download: DownloadOptions | None = None  # fetch each raw_url into ``images`` (layout url)
    retry_failed: tuple[str, ...] = ()  # with download: re-attempt urls failed with these reasons


class DocumentError(ValueError):
    """A source line that cannot become a record; ``args[0]`` is the reason."""


def unit_stem(path: str) -> str:
    """The unit's name: the file's name less ``.zip``, ``.gz``/``.zst`` after ``.jsonl``,
    ``.jsonl`` and ``.json`` (``x.jsonl.zip`` and ``x.jsonl.gz`` are both ``x``)."""
    name = Path(path).name
    if kind_of(name) in ("gz", "zst"):
        name = name.rsplit(".", 1)[0]
    for suffix in (".zip", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return safe_stem(name)


def flat_folder_candidates(images: str, unit: Unit) -> list[str]:
    """Possible names of the flat per-shard folder: ``<stem>_images`` for several readings of <shard>."""
    name = posixpath.basename(unit.source)
    stems = [unit_stem(unit.source), name.removesuffix(".zip"), name.split(".")[0]]
    digits = "".join(ch if ch.isdigit() else " " for ch in name.split(".")[0]).split()
    if digits:
        stems += [digits[0], f"shard_{digits[0]}"]
    return [remote.join(images, f"{stem}_images") for stem in dict.fromkeys(stems)]


SHARD_NUMBER = re.compile(r"shard_?(\d+)", re.IGNORECASE)


def shard_number(path: str) -> int | None:
    """The shard number in a zip's name: the digits after ``shard`` (``docs_shard_12_v2.jsonl.zip``
    is 12), else the name's one run of digits; None when it has none, or several and no ``shard``."""
    stem = posixpath.basename(path).split(".")[0]
    if (found := SHARD_NUMBER.search(stem)) is not None:
        return int(found.group(1))
    runs = re.findall(r"\d+", stem)
    return int(runs[0]) if len(runs) == 1 else None


def indexed_units(units: list[Unit], listed: bool) -> list[Unit] | None:
    """The units with ``index`` set to their folder under the indexed layout: the shard number in
    the zip's name, or its position in the list when the name has none and the list was given
    file by file (``listed``: a brace pattern keeps missing shards in place). None when a name has
    no number and the list came from a folder or glob, where positions skip the gaps."""
    numbered = []
    for unit in units:
        number = shard_number(unit.source)
        if number is None and not listed:
            return None
        numbered.append(replace(unit, index=unit.index if number is None else number))
    return numbered


def image_folder(images: str, unit: Unit, layout: str) -> str:
    """Where this unit's images live under ``layout`` (indexed: ``<images>/<unit.index>``, which
    ``indexed_units`` sets; or flat)."""
    if layout == "indexed":
        return remote.join(images, str(unit.index))
    candidates = flat_folder_candidates(images, unit)
    return next((c for c in candidates if remote.isdir(c)), candidates[0])


def iter_lines(path: str) -> Iterator[tuple[str, int, bytes | None]]:
    """(member, line number, raw line) for every non-blank line of every .jsonl member of the zip
    (see ``jsonl_members``), or of the jsonl file (its member name is its path; see
    ``inflation_cap``). A line over ``MAX_LINE_BYTES`` is None: it is skipped unread, so one
    huge line (a zip bomb) never has to fit in memory; BadZipFile for a compression bomb (see
    ``inflation_problem``). Members are not CRC-checked here."""
    if kind_of(path) is not None:
        with open_documents(path, inflation_cap(path)) as reader:
            for number, line in _numbered_lines(reader):
                yield path, number, line
        return
    with remote.open_binary(path) as handle, _open_zip(handle) as zf:
        members = jsonl_members(zf)
        if (problem := inflation_problem(members)) is not None:
            raise zipfile.BadZipFile(f"a compression bomb: {problem}")
        for info in members:
            with zf.open(info) as member:
                for number, line in _numbered_lines(member):
                    yield info.filename, number, line


def jsonl_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The zip's .jsonl members (any case: a zip made on another system may say .JSONL; macOS's
    ``__MACOSX/._*`` copies left out) in name order, each entry once: two members of one name are
    two members (opening by name would read the last one twice). BadZipFile when there is none."""
    members = sorted(
        (info for info in zf.infolist() if _is_jsonl_member(info.filename)),
        key=lambda info: info.filename,
    )
    if not members:
        raise zipfile.BadZipFile("no .jsonl member")
    return members


def inflation_problem(members: list[zipfile.ZipInfo]) -> str | None:
    """Why the members are refused unread, or None: a zip whose jsonl inflates past
    ``BOMB_MIN_BYTES`` at over ``MAX_INFLATION`` times its compressed size is a bomb (JSON text
    compresses a few times), and reading it would cost that many times the download."""
    inflated = sum(info.file_size for info in members)
    compressed = sum(info.compress_size for info in members)
    if inflated > BOMB_MIN_BYTES and inflated > MAX_INFLATION * max(compressed, 1):
        return f"{inflated} bytes of jsonl from {compressed} compressed (over {MAX_INFLATION}x)"
    return None


def inflation_cap(path: str) -> int | None:
    """How many bytes a compressed jsonl file may inflate to (the zip rule: ``BOMB_MIN_BYTES``, or
    ``MAX_INFLATION`` times its size if more); None for a plain .jsonl."""
    if kind_of(path) in (None, "jsonl"):
        return None
    return max(BOMB_MIN_BYTES, MAX_INFLATION * remote.size(path))


def stream_problem(path: str, cap: int | None) -> StreamError | None:
    """What stops the compressed file from being converted, found by inflating it once
    (bounded by ``cap``, a block at a time): InflationBomb or CorruptStream refuse it whole;
    TruncatedStream (or None) lets its lines before the break be converted."""
    if cap is None:
        return None
    try:
        with open_documents(path, cap) as reader:
            while reader.read(READ_BLOCK):
                pass
    except StreamError as exc:
        return exc
    return None


def crc_is_bad(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """True when the member reads to its end and its bytes fail their CRC-32. Read once ahead of
    converting, because the check only happens at the member's end. Other read errors are left to
    the conversion pass, which counts them (truncated_zip / unreadable_zip)."""
    try:
        with zf.open(info) as member:
            while member.read(READ_BLOCK):
                pass
    except zipfile.BadZipFile as exc:
        return str(exc).startswith("Bad CRC-32")
    except ZIP_READ_ERRORS:
        return False
    return False


def _open_zip(handle: IO[bytes]) -> zipfile.ZipFile:
    """The zip, or CutOffZipError for one that starts with a zip entry but has lost its end: a
    cut-off download reads as "File is not a zip file" otherwise, which sends users looking for
    a wrong format instead of a download to redo."""
    try:
        return zipfile.ZipFile(handle)
    except zipfile.BadZipFile:
        handle.seek(0)
        if handle.read(4) == b"PK\x03\x04":
            raise CutOffZipError(
                "starts as a zip does but its end (the central directory) is missing:"
                " a cut-off download or copy"
            ) from None
        raise


def _is_jsonl_member(name: str) -> bool:
    """A .jsonl file, not the AppleDouble copy (``__MACOSX/._x.jsonl``, binary) that a zip made by
    macOS holds beside each file: its bytes would be counted as bad_json documents."""
    parts = name.split("/")
    return (
        name.lower().endswith(".jsonl")
        and "__MACOSX" not in parts
        and not parts[-1].startswith("._")
    )


@dataclass(slots=True)
class LineCount:
    """Lines of a member read so far, blank ones included (keys number source lines)."""

    lines: int = 0


def _numbered_lines(
    reader: IO[bytes], count: LineCount | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without its newline) for each line holding more than whitespace; None
    for a line over ``MAX_LINE_BYTES`` (newline included), whose bytes are dropped as they come.
    ``count`` follows the lines read. Blank lines, however long, are skipped a block at a time by
    the regex engine, so a member of blank lines costs its inflation only."""
    count = count if count is not None else LineCount()
    pending = _Pending()
    while block := reader.read(READ_BLOCK):
        cut = block.find(b"\n")
        if cut < 0:
            pending.add(block)
            continue
        count.lines += 1
        pending.add(block[:cut])
        if pending.has_text:
            yield count.lines, pending.line()
        last = block.rfind(b"\n")
        first = count.lines
        for offset, line in _block_lines(block, cut + 1, last):
            count.lines = first + offset
            yield count.lines, line
        count.lines = first + block.count(b"\n", cut + 1, last + 1)
        pending = _Pending()
        pending.add(block[last + 1 :])
    if pending.size:
        count.lines += 1
        if pending.has_text:
            yield count.lines, pending.line()


@dataclass(slots=True)
class _Pending:
    """The line not yet ended: its pieces while under the cap (None past it), its size, and
    whether it holds more than whitespace."""

    pieces: list[bytes] | None = field(default_factory=list)
    size: int = 0
    has_text: bool = False

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        self.has_text = self.has_text or _NON_SPACE.search(piece) is not None
        if self.pieces is not None and self.size + 1 <= MAX_LINE_BYTES:
            self.pieces.append(piece)
        else:
            self.pieces = None

    def line(self) -> bytes | None:
        """The line, or None when it is over the cap (newline included)."""
        return None if self.pieces is None else b"".join(self.pieces)


def _block_lines(block: bytes, start: int, stop: int) -> Iterator[tuple[int, bytes | None]]:
    """(lines before it in ``block[start:stop]``, plus one; line) for each non-blank line there,
    every line of which ends with a newline; whitespace is skipped by the regex engine."""
    if not block[start:stop].translate(None, SPACE_BYTES):  # a block of blank lines, at C speed
        return
    offset, pos = 0, start
    while (found := _NON_SPACE.search(block, pos, stop)) is not None:
        begin = max(block.rfind(b"\n", pos, found.start()) + 1, pos)
        end = block.find(b"\n", found.start(), stop + 1)
        offset += block.count(b"\n", pos, begin)
        line = block[begin:end]
        yield offset + 1, (line if len(line) + 1 <= MAX_LINE_BYTES else None)
        offset += 1
        pos = end + 1


def parse_document(line: bytes) -> dict[str, Any]:
    """Decode and structurally check one MMC4 line; raises DocumentError(reason). NaN, ±Infinity
    and numbers beyond a double's range (``1e400``) parse as non-finite floats: a reject in the
    similarity matrix, elsewhere written as null and counted by ``encode_record``."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError) as exc:  # also a >4300-digit integer, deep nesting
        raise DocumentError("bad_json") from exc
    if not isinstance(doc, dict):
        raise DocumentError("not_an_object")
    text_list, image_info, matrix = (
        doc.get("text_list"),
        doc.get("image_info"),
        doc.get("similarity_matrix"),
    )
    if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
        raise DocumentError("bad_text_list")
    if not text_list:
        raise DocumentError("empty_text_list")
    if not isinstance(image_info, list) or not all(
        _valid_info(i, len(text_list)) for i in image_info
    ):
        raise DocumentError("bad_image_info")
    if not _matrix_shape_ok(matrix, len(image_info), len(text_list)):
        raise DocumentError("bad_matrix_shape")
    if not _optional_fields_ok(doc, image_info):
        raise DocumentError("schema")
    return doc


def _optional_fields_ok(doc: dict[str, Any], image_info: list[dict[str, Any]]) -> bool:
    """The rest of schemas/interleaved.schema.json, checked by hand (jsonschema per record is slow).
    No ``is_gpt`` key, whatever its value: open_flamingo tests its presence and reads the document
    as a GPT sequence (a KeyError on ``example``, the document lost)."""
    if "is_gpt" in doc:
        return False
    if not isinstance(doc.get("url", ""), str) or doc.get("could_have_url_duplicate", 0) not in (
        0,
        1,
    ):
        return False
    if isinstance(doc.get("could_have_url_duplicate"), bool):
        return False
    return all(
        isinstance(i.get("raw_url", ""), str) and _is_number(i.get("matched_sim", 0.0))
        for i in image_info
    )


def _valid_info(info: Any, n_sentences: int) -> bool:
    """Images come only from --images: bytes already in the source would skip the image stage."""
    if not isinstance(info, dict) or not isinstance(info.get("image_name"), str):
        return False
    if "image_base64" in info:
        return False
    index = info.get("matched_text_index")
    return isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n_sentences


def _matrix_shape_ok(matrix: Any, rows: int, cols: int) -> bool:
    if not isinstance(matrix, list) or len(matrix) != rows:
        return False
    return all(
        isinstance(r, list) and len(r) == cols and all(_is_number(v) for v in r) for r in matrix
    )


def _is_number(value: Any) -> bool:
    """A finite JSON number (``NaN``/``Infinity`` parse in Python but are not JSON)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _safe_image_name(name: str) -> bool:
    """A plain file name: no folder part, no NUL, and a valid path (a lone surrogate is not)."""
    if not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return False
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def attach_images(
    doc: InterleavedDoc,
    images: str | os.PathLike[str] | UrlStore,
    ctx: UnitContext,
    key: str,
    policy: ImagePolicy,
) -> int:
    """Load, check and attach each image's bytes, from the unit's image folder (by
    ``image_name``) or a url store (by ``raw_url``); returns how many have bytes. Every outcome
    counted."""
    found = 0
    for info in doc.image_info:
        image_key = f"{key}/{info.image_name}"
        if isinstance(images, (str, os.PathLike)):
            data = _image_by_name(os.fspath(images), info, ctx, image_key, policy)
        else:
            data = _image_by_url(images, info.raw_url, ctx, image_key, policy)
        if data is None:
            continue
        result = process_image(data, policy)
        if not result.ok:
            ctx.reject("images", image_key, result.reason or "rejected", url=info.raw_url)
            continue
        ctx.stats.add("images", "found")
        ctx.stats.add("images", result.outcome)
        info.image_bytes = result.data
        found += 1
    return found


def _image_by_name(
    folder: str, info: ImageInfo, ctx: UnitContext, image_key: str, policy: ImagePolicy
) -> bytes | None:
    if not _safe_image_name(info.image_name):
        ctx.reject("images", image_key, "unsafe_image_name", url=info.raw_url)
        return None
    try:
        return remote.read_bytes(remote.join(folder, info.image_name), policy.max_bytes + 1)
    except OSError:  # absent, a folder, a name too long for the filesystem...
        ctx.stats.add("images", "missing")
        ctx.list_reject("images", image_key, "missing", url=info.raw_url)
        return None


def _image_by_url(
    store: UrlStore, url: str, ctx: UnitContext, image_key: str, policy: ImagePolicy
) -> bytes | None:
    """The fetched bytes of ``url``, or None with the reason it has none counted (``no_url``,
    ``bad_url`` for a url that is not http(s), else the download's reason)."""
    if not is_web_url(url):
        reason = "no_url" if not url else "bad_url"
    else:
        data, reason = store.get(url, policy.max_bytes + 1)
        if data is not None:
            return data
    ctx.reject("images", image_key, reason, url=url)
    return None


def convert_line(
    line: bytes | None, key: str, folder: str | UrlStore, ctx: UnitContext, options: Mmc4Options
) -> None:
    """One jsonl line (None: over ``MAX_LINE_BYTES``) -> one written record or one counted reject;
    its images' lines in ``rejects.jsonl`` say which it was."""
    since = len(ctx.rejects)
    written = _convert_document(line, key, folder, ctx, options)
    ctx.settle_images(since, "written" if written else "rejected")


def _convert_document(
    line: bytes | None, key: str, folder: str | UrlStore, ctx: UnitContext, options: Mmc4Options
) -> bool:
    ctx.stats.add("documents", "in")
    if line is None:
        ctx.reject("documents", key, "line_too_long", f"over {MAX_LINE_BYTES} bytes")
        return False
    try:
        doc = InterleavedDoc.from_json(parse_document(line))
    except DocumentError as exc:
        ctx.reject("documents", key, exc.args[0])
        return False
    ctx.stats.add("images", "in", len(doc.image_info))
    found = attach_images(doc, folder, ctx, key, options.policy)
    if found == 0 and not options.keep_docs_without_images:
        ctx.reject("documents", key, "no_images")
        return False
    if found < len(doc.image_info) and options.drop_docs_with_missing_images:
        ctx.reject("documents", key, "missing_images")
        return False
    record = doc.to_json()
    errors = schema_errors("interleaved", record) if options.schema_check else []
    if errors:
        ctx.reject("documents", key, "schema", "; ".join(errors))
        return False
    try:
        encoded = encode_record(record)
    except RecordEncodingError as exc:
        ctx.reject("documents", key, exc.args[0], exc.args[1])
        return False
    ctx.write_record(key, encoded)
    ctx.stats.add("documents", "written")
    return True


def convert_unit(unit: Unit, ctx: UnitContext, options: Mmc4Options, layout: str) -> None:
    """Convert every line of one document file; an unreadable or truncated zip is a counted unit-level reject.

    Only errors from *reading* the zip are caught: a write error (full disk) must stop the run.
    """
    folder = (
        _url_store(options.images)
        if layout == "url"
        else image_folder(options.images, unit, layout)
    )
    lines = _unit_lines if kind_of(unit.source) is None else stream_unit_lines
    for key, line in lines(unit, ctx):
        convert_line(line, key, folder, ctx, options)


def _unit_lines(unit: Unit, ctx: UnitContext) -> Iterator[tuple[str, bytes | None]]:
    """(key, line) for each non-blank line of the zip's members whose CRC holds; keys number
    lines across the members, blank lines included, so a key names its source line. A member
    that fails its CRC gives no line: its documents are counted bad_crc. A zip that cannot be
    read (or breaks off) is a unit reject; the lines read before a break are kept."""
    before = 0  # lines of the members already read
    count = LineCount()
    try:
        with remote.open_binary(unit.source) as handle, _open_zip(handle) as zf:
            members = jsonl_members(zf)
            if (problem := inflation_problem(members)) is not None:
                ctx.reject("units", unit.name, "compression_bomb", problem)
                return
            for info in members:
                before, count = before + count.lines, LineCount()
                if crc_is_bad(zf, info):
                    count = _reject_damaged(zf, info, ctx, before)
                    continue
                with zf.open(info) as member:
                    for number, line in _numbered_lines(member, count):
                        yield f"{unit.name}-{before + number:07d}", line
    except ZIP_READ_ERRORS as exc:
        cut_off = before + count.lines > 0 or isinstance(exc, CutOffZipError)
        reason = "truncated_zip" if cut_off else "unreadable_zip"
        ctx.reject("units", unit.name, reason, f"{type(exc).__name__}: {exc}")


def stream_unit_lines(unit: Unit, ctx: UnitContext) -> Iterator[tuple[str, bytes | None]]:
    """(key, line) for each non-blank line of a .jsonl, .jsonl.gz or .jsonl.zst file, keyed as a
    zip's (lines from 1, blank ones included). A compressed file that inflates past its cap
    (compression_bomb) or fails its format's checks (unreadable_stream) is refused before a line
    is converted; one cut off (truncated_stream) keeps the lines before the break."""
    cap = inflation_cap(unit.source)
    problem = stream_problem(unit.source, cap)
    if isinstance(problem, InflationBomb):
        ctx.reject("units", unit.name, "compression_bomb", f"{problem}: over {MAX_INFLATION}x")
        return
    if isinstance(problem, CorruptStream):
        ctx.reject("units", unit.name, "unreadable_stream", str(problem))
        return
    try:
        with open_documents(unit.source, cap) as reader:
            for number, line in _numbered_lines(reader):
                yield f"{unit.name}-{number:07d}", line
    except StreamError as exc:  # also a file that changed since the check above
        reason = "truncated_stream" if isinstance(exc, TruncatedStream) else "unreadable_stream"
        ctx.reject("units", unit.name, reason, str(exc))
    except OSError as exc:
        ctx.reject("units", unit.name, "unreadable_stream", f"{type(exc).__name__}: {exc}")


def _reject_damaged(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, ctx: UnitContext, before: int
) -> LineCount:
    """Count every document of a member whose bytes fail their CRC-32 as bad_crc (its text may be
    damaged, so none is written), plus a unit reject so that --resume redoes the zip."""
    name = ctx.unit.name
    detail = f"{info.filename}: its bytes fail their CRC-32 (a damaged download or copy)"
    ctx.reject("units", name, "bad_crc", detail)
    count = LineCount()
    with zf.open(info) as member:
        # zipfile raises at the end and drops the last block read: turn its check off (a private
        # attribute, CPython 3.6+) to count and key every line; their text is not used
        member._expected_crc = None
        for number, _line in _numbered_lines(member, count):
            ctx.stats.add("documents", "in")
            ctx.reject("documents", f"{name}-{before + number:07d}", "bad_crc")
    return count


def detect_layout(
    units: list[Unit], options: Mmc4Options, sample_docs: int = 200, indexed_ok: bool = True
) -> tuple[str, dict[str, float]]:
    """Found-rate of images under each layout on a sample of documents; the best one wins.
    ``indexed_ok``: False when the units have no indexed folder (see ``indexed_units``).

    Raises LayoutError when even the best layout finds under ``min_found_rate`` of the images.
    """
    layouts = ("indexed", "flat") if options.layout == "auto" else (options.layout,)
    layouts = layouts if indexed_ok else tuple(x for x in layouts if x != "indexed")
    names = _sample_image_names(units, sample_docs)
    if not names:
        return (layouts[0], {})
    rates = {}
    for layout in layouts:
        hits = sum(
            remote.isfile(remote.join(image_folder(options.images, unit, layout), name))
            for unit, name in names
        )
        rates[layout] = hits / len(names)
    best = max(rates, key=rates.get)
    if rates[best] < options.min_found_rate:
        raise LayoutError(_layout_message(options, rates, len(names)))
    return best, rates


def _layout_message(options: Mmc4Options, rates: dict[str, float], checked: int) -> str:
    found = ", ".join(f"{layout}: {rate:.0%}" for layout, rate in rates.items())
    return (
        f"nearly every image is missing under `images` {options.images} ({found} of {checked} "
        f"sampled images found). Check the folder and `layout`: indexed = <images>/<shard number in the "
        f"document file's name, or its position in a brace pattern when the name has none>/<image_name>, "
        f"flat = <images>/<shard>_images/<image_name>"
    )


def _no_number_message(units: list[Unit]) -> str:
    unnumbered = next(u.source for u in units if shard_number(u.source) is None)
    return (
        f"{unnumbered} has no shard number in its name, so its `layout` indexed folder is "
        "unknown: give `docs` as a brace pattern listing the document files in the order their images were "
        "downloaded in (e.g. 'docs/{a,b,c}.zip') or use `layout` flat"
    )


def _sample_image_names(units: list[Unit], limit: int) -> list[tuple[Unit, str]]:
    """About ``limit`` image names, an equal share from each of up to ``SAMPLE_UNITS`` zips evenly
    spaced in the list: an MMC4 zip holds thousands of images, so the first zip alone would decide,
    and one shard whose images are absent would stop a run that has most of them."""
    step = max(1, math.ceil(len(units) / SAMPLE_UNITS))
    picked = units[::step]
    share = math.ceil(limit / len(picked))
    names: list[tuple[Unit, str]] = []
    for unit in picked:
        names += _unit_image_names(unit, share)
    return names


def _unit_image_names(unit: Unit, limit: int) -> list[tuple[Unit, str]]:
    names: list[tuple[Unit, str]] = []
    try:
        for _member, _number, line in iter_lines(unit.source):
            names.extend((unit, i["image_name"]) for i in _image_infos(line))
            if len(names) >= limit:
                break
    except ZIP_READ_ERRORS:
        pass
    return names[:limit]


def _image_infos(line: bytes | None) -> list[dict[str, Any]]:
    """The sampled line's image entries; any malformed line gives none (conversion rejects it)."""
    if line is None:
        return []
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return []
    infos = doc.get("image_info") if isinstance(doc, dict) else None
    if not isinstance(infos, list):
        return []
    return [i for i in infos if isinstance(i, dict) and isinstance(i.get("image_name"), str)]


def convert_mmc4(
    docs: str | list[str],
    options: Mmc4Options,
    run: RunOptions,
    *,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Convert MMC4 zips into interleaved shards in ``run.out_dir``; returns the merged stats."""
    return run_conversion(plan_mmc4(docs, options), run, overwrite=overwrite, execution=execution)


def plan_mmc4(docs: str | list[str], options: Mmc4Options) -> ConversionPlan:
    """One unit per document file (zip, .jsonl, .jsonl.gz, .jsonl.zst), its images found under the
    detected layout, or by url in ``images`` (layout url; fetched there first with ``download``);
    inputs checked here."""
    if options.layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, not {options.layout!r}")
    if options.download is not None and options.layout not in ("auto", "url"):
        raise InputError(
            f"`download` finds images by url: `layout` {options.layout} cannot be used"
        )
    duplicates: list[str] = []
    sources = expand_specs(
        docs,
        folder_suffix=(".zip", *SUFFIXES),
        keep_missing=True,
        ignore_case=True,
        duplicates=duplicates,
    )
    units = [u for u in unit_names(sources, unit_stem) if remote.isfile(u.source)]
    if not units:
        raise SpecError(f"no MMC4 zip, .jsonl, .jsonl.gz or .jsonl.zst file matches {docs!r}")
    if options.download is None and not remote.isdir(options.images):
        raise SpecError(missing_folder("images", options.images))
    counts = Stats(converter="mmc4")
    counts.add("units", "missing_input", len(sources) - len(units))
    if duplicates:
        counts.add("units", "duplicate_input", len(duplicates))
    if options.download is not None or _is_url_folder(options):
        layout, before = "url", _download_step(units, options, counts)
    else:
        layout, units, before = *_file_layout(docs, units, options), None
    counts.add("units", f"layout_{layout}")
    settings = {
        "layout": layout,
        "keep_docs_without_images": options.keep_docs_without_images,
        "drop_docs_with_missing_images": options.drop_docs_with_missing_images,
        "policy": options.policy,
    }
    return ConversionPlan(
        converter="mmc4",
        settings=settings,
        units=lambda run: units,
        convert_unit=partial(convert_unit, options=options, layout=layout),
        input_counts=counts,
        before=before,
    )


def _is_url_folder(options: Mmc4Options) -> bool:
    """Images by url: asked for, or ``auto`` and ``images`` is an img2dataset output."""
    from flamingo_data.fetch.i2d_output import finished_shards, require_output

    if options.layout == "url":
        require_output(options.images, "images")
        return True
    return options.layout == "auto" and bool(finished_shards(options.images))


def _download_step(units: list[Unit], options: Mmc4Options, counts: Stats) -> DownloadStep:
    from flamingo_data.converters.downloads import DownloadStep
    from flamingo_data.fetch.url_images import UrlImages

    source = UrlImages(options.images, options.download, options.retry_failed)
    return DownloadStep(units, unit_raw_urls, source, counts)


def _file_layout(
    docs: str | list[str], units: list[Unit], options: Mmc4Options
) -> tuple[str, list[Unit]]:
    """The indexed or flat layout the images are found under, and the units (indexed: numbered)."""
    numbered = indexed_units(units, listed=not lists_folder_or_glob(docs))
    if numbered is None and options.layout == "indexed":
        raise SpecError(_no_number_message(units))
    try:
        layout, _rates = detect_layout(numbered or units, options, indexed_ok=numbered is not None)
    except LayoutError as exc:
        if numbered is None:  # the indexed layout could not be tried: say how to make it work
            raise LayoutError(f"{exc}. {_no_number_message(units)}") from exc
        raise
    return layout, numbered or units


def unit_raw_urls(unit: Unit) -> Iterator[str]:
    """Every image ``raw_url`` (a string) of the unit's readable documents; what cannot be read
    gives none (the conversion counts it)."""
    try:
        for _member, _number, line in iter_lines(unit.source):
            for info in _image_infos(line):
                if isinstance(url := info.get("raw_url"), str) and url:
                    yield url
    except (*ZIP_READ_ERRORS, StreamError):
        return


def _url_store(folder: str) -> UrlStore:
    from flamingo_data.fetch.url_images import url_store  # pandas loads only for images by url

    return url_store(folder)
