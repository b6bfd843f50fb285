"""MMC4 zips + downloaded images -> interleaved (MMC4-form) shards with embedded base64 images.

One unit per input zip. Each jsonl line becomes one record keyed ``<unit>-<line>`` or a counted,
reasoned reject. Image layouts: ``indexed`` (``<images>/<position in the shard list>/<name>``)
and ``flat`` (``<images>/<shard>_images/<name>``); ``auto`` picks the one where images are found
and fails loudly when nearly every image is missing under both.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from flamingo_data import remote
from flamingo_data.errors import (
    InputError,
    LayoutError,  # noqa: F401 -- importable from here too
)
from flamingo_data.executors import run_units
from flamingo_data.images import ImagePolicy, process_image
from flamingo_data.records import InterleavedDoc, RecordEncodingError, encode_record
from flamingo_data.schema import schema_errors
from flamingo_data.shards import safe_stem
from flamingo_data.specs import SpecError, expand_specs
from flamingo_data.stats import Stats
from flamingo_data.units import (
    RunOptions,
    Unit,
    UnitContext,
    finalize,
    output_settings,
    prepare_out_dir,
    unit_names,
)

LAYOUTS = ("auto", "indexed", "flat")
# A document line longer than this is counted line_too_long and never held whole: MMC4 lines are
# kilobytes (a few MB at most), while a zip bomb's one line took 4x its size to read and parse.
MAX_LINE_BYTES = 64 * 2**20
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


class DocumentError(ValueError):
    """A source line that cannot become a record; ``args[0]`` is the reason."""


def unit_stem(path: str) -> str:
    name = Path(path).name
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


def image_folder(images: str, unit: Unit, layout: str) -> str:
    """Where this unit's images live under ``layout`` (indexed or flat)."""
    if layout == "indexed":
        return remote.join(images, str(unit.index))
    candidates = flat_folder_candidates(images, unit)
    return next((c for c in candidates if remote.isdir(c)), candidates[0])


def iter_lines(path: str) -> Iterator[tuple[str, int, bytes | None]]:
    """(member, line number, raw line) for every .jsonl member of the zip (any case: a zip made
    on another system may say .JSONL; macOS's ``__MACOSX/._*`` copies left out), members in name order. A line over ``MAX_LINE_BYTES`` is
    None: it is skipped unread, so one huge line (a zip bomb) never has to fit in memory."""
    with remote.open_binary(path) as handle, _open_zip(handle) as zf:
        members = sorted(n for n in zf.namelist() if _is_jsonl_member(n))
        if not members:
            raise zipfile.BadZipFile("no .jsonl member")
        for member in members:
            with zf.open(member) as handle:
                for number, line in enumerate(_capped_lines(io.BufferedReader(handle)), start=1):
                    yield member, number, line


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


def _capped_lines(reader: io.BufferedReader) -> Iterator[bytes | None]:
    """The reader's lines, each None when longer than ``MAX_LINE_BYTES`` (newline included); the
    rest of such a line is read in pieces of that size and dropped."""
    limit = MAX_LINE_BYTES
    while line := reader.readline(limit + 1):
        if len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = reader.readline(limit)
        yield None


def parse_document(line: bytes) -> tuple[dict[str, Any], int]:
    """Decode and structurally check one MMC4 line; raises DocumentError(reason). Also returns how
    many NaN/Infinity values it holds: JSON has none, so a written record has null in their place,
    and that change is counted rather than silent (in the similarity matrix they are a reject)."""
    constants: list[str] = []

    def non_finite(name: str) -> float:
        constants.append(name)
        return float(name)

    try:
        doc = json.loads(line, parse_constant=non_finite)
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
    return doc, len(constants)


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
    doc: InterleavedDoc, folder: str, ctx: UnitContext, key: str, policy: ImagePolicy
) -> int:
    """Load, check and attach each image's bytes; returns how many have bytes. Every outcome counted."""
    found = 0
    for info in doc.image_info:
        if not _safe_image_name(info.image_name):
            ctx.reject("images", f"{key}/{info.image_name}", "unsafe_image_name")
            continue
        try:
            data = remote.read_bytes(remote.join(folder, info.image_name), policy.max_bytes + 1)
        except OSError:  # absent, a folder, a name too long for the filesystem...
            ctx.stats.add("images", "missing")
            continue
        result = process_image(data, policy)
        if not result.ok:
            ctx.reject("images", f"{key}/{info.image_name}", result.reason or "rejected")
            continue
        ctx.stats.add("images", "found")
        ctx.stats.add("images", result.outcome)
        info.image_bytes = result.data
        found += 1
    return found


def convert_line(
    line: bytes | None, key: str, folder: str, ctx: UnitContext, options: Mmc4Options
) -> None:
    """One jsonl line (None: over ``MAX_LINE_BYTES``) -> one written record or one counted reject."""
    ctx.stats.add("documents", "in")
    if line is None:
        ctx.reject("documents", key, "line_too_long", f"over {MAX_LINE_BYTES} bytes")
        return
    try:
        parsed, non_finite = parse_document(line)
        doc = InterleavedDoc.from_json(parsed)
    except DocumentError as exc:
        ctx.reject("documents", key, exc.args[0])
        return
    ctx.stats.add("images", "in", len(doc.image_info))
    found = attach_images(doc, folder, ctx, key, options.policy)
    if found == 0 and not options.keep_docs_without_images:
        ctx.reject("documents", key, "no_images")
        return
    if found < len(doc.image_info) and options.drop_docs_with_missing_images:
        ctx.reject("documents", key, "missing_images")
        return
    record = doc.to_json()
    errors = schema_errors("interleaved", record) if options.schema_check else []
    if errors:
        ctx.reject("documents", key, "schema", "; ".join(errors))
        return
    try:
        data = encode_record(record)
    except RecordEncodingError as exc:
        ctx.reject("documents", key, exc.args[0], exc.args[1])
        return
    ctx.write(key, {"json": data})
    ctx.stats.add("documents", "written")
    if non_finite:  # NaN/Infinity outside the matrix (e.g. face_detections): written as null
        ctx.stats.add("values", "non_finite_as_null", non_finite)


def convert_unit(unit: Unit, ctx: UnitContext, options: Mmc4Options, layout: str) -> None:
    """Convert every line of one zip; an unreadable or truncated zip is a counted unit-level reject.

    Only errors from *reading* the zip are caught: a write error (full disk) must stop the run.
    """
    folder = image_folder(options.images, unit, layout)
    for count, line in _safe_lines(unit, ctx):
        convert_line(line, f"{unit.name}-{count:07d}", folder, ctx, options)


def _safe_lines(unit: Unit, ctx: UnitContext) -> Iterator[tuple[int, bytes | None]]:
    """(line number across the zip's members, line) for each non-blank line: blank lines still
    count, so a key names its source line."""
    lines, read = iter_lines(unit.source), 0
    while True:
        try:
            _member, _number, line = next(lines)
        except StopIteration:
            return
        except ZIP_READ_ERRORS as exc:
            cut_off = read > 0 or isinstance(exc, CutOffZipError)
            reason = "truncated_zip" if cut_off else "unreadable_zip"
            ctx.reject("units", unit.name, reason, f"{type(exc).__name__}: {exc}")
            return
        read += 1
        if line is None or line.strip():
            yield read, line


def detect_layout(
    units: list[Unit], options: Mmc4Options, sample_docs: int = 200
) -> tuple[str, dict[str, float]]:
    """Found-rate of images under each layout on a sample of documents; the best one wins.

    Raises LayoutError when even the best layout finds under ``min_found_rate`` of the images.
    """
    layouts = ("indexed", "flat") if options.layout == "auto" else (options.layout,)
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
        f"nearly every image is missing under --images {options.images} ({found} of {checked} sampled "
        f"images found). Check the folder and --image-layout: indexed = <images>/<position of the zip in "
        f"the --docs list>/<image_name>, flat = <images>/<shard>_images/<image_name>"
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
    processes: int | None = None,
    executor: str = "local",
    master: str | None = None,
    progress: bool = True,
) -> Stats:
    """Convert MMC4 zips into interleaved shards in ``run.out_dir``; returns the merged stats."""
    if options.layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, not {options.layout!r}")
    sources = expand_specs(docs, folder_suffix=".zip", keep_missing=True, ignore_case=True)
    units = [u for u in unit_names(sources, unit_stem) if remote.isfile(u.source)]
    if not units:
        raise SpecError(f"no MMC4 zip matches {docs!r}")
    if not remote.isdir(options.images):
        raise SpecError(f"image folder {options.images} does not exist")
    layout, _rates = detect_layout(units, options)
    run = output_settings(
        run,
        layout=layout,
        keep_docs_without_images=options.keep_docs_without_images,
        drop_docs_with_missing_images=options.drop_docs_with_missing_images,
        policy=options.policy,
    )
    prepare_out_dir(run.out_dir, run.resume, overwrite, run.settings)
    fn = partial(convert_unit, options=options, layout=layout)
    run_units(
        units, fn, run, executor=executor, processes=processes, progress=progress, master=master
    )
    missing = Stats(converter="mmc4")
    missing.add("units", "missing_input", len(sources) - len(units))
    missing.add("units", f"layout_{layout}")
    return finalize(run.out_dir, "mmc4", missing)
