"""``validate``: prove a set of shards is fit for training before a GPU hour is spent.

Checks every tar end to end (readable, safe member names, unique keys, the members each kind needs),
every record against its JSON Schema, and what a schema cannot express (matrix shape, index bounds,
placeholders <-> image_map, base64 decodes to an image; ``deep`` decodes every image under the pixel
cap). Compares counts with ``sizes.json`` or writes it. Never unpickles or evaluates anything.
"""

from __future__ import annotations

import binascii
import json
import math
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from tqdm import tqdm

from flamingo_data.check.keyindex import KeyIndex
from flamingo_data.core.records import decode_base64
from flamingo_data.core.schema import record_kind, schema_errors
from flamingo_data.errors import (
    InputError,
    SizesFileError,  # noqa: F401 -- importable from here too
)
from flamingo_data.images.stage import DEFAULT_MAX_PIXELS, decode_at_least, sniff_format
from flamingo_data.run.procpool import map_in_processes
from flamingo_data.storage import remote
from flamingo_data.storage.shard_reader import (
    DECODED_EXTS,
    IMAGE_EXTS,
    ReadIssue,
    Sample,
    iter_samples,
)
from flamingo_data.storage.specs import SpecError, expand_specs

PLACEHOLDER = re.compile(r"_!_IMAGE(\d+)_!_")
LOADER_IMAGE_SIZE = 224  # LoaderConfig.image_size: --deep decodes as the loader's workers do
# open_flamingo's MMC4 path skips an image when len(bytes) // 1000 <= 10, then a document left with
# none; our loader keeps both (min_image_bytes=0), so this is a count for upstream's users, not a failure.
OPEN_FLAMINGO_MIN_IMAGE_BYTES = 11_000


@dataclass
class Failure:
    shard: str
    key: str
    reason: str
    detail: str = ""


@dataclass
class ValidationReport:
    """What was checked and every failure, by key and reason; ``ok`` only when nothing failed."""

    shards: int = 0
    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    images: int = 0
    failures: list[Failure] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    # what open_flamingo's own loader would drop from interleaved records that pass (see above)
    open_flamingo_skips: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.shards > 0 and not self.failures

    def reasons(self) -> Counter:
        return Counter(f.reason for f in self.failures)

    def merge(self, other: ValidationReport) -> None:
        """Add one shard's report (checked in a worker process) to this one."""
        self.shards += other.shards
        self.samples += other.samples
        self.kinds.update(other.kinds)
        self.images += other.images
        self.failures.extend(other.failures)
        self.sizes.update(other.sizes)
        self.open_flamingo_skips.update(other.open_flamingo_skips)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "images": self.images,
            "kinds": dict(self.kinds),
            "failures_by_reason": dict(self.reasons()),
            "failures": [f.__dict__ for f in self.failures],
            "sizes": self.sizes,
            "open_flamingo_skips": {
                "images_under_11000_bytes": self.open_flamingo_skips["images"],
                "documents_left_without_images": self.open_flamingo_skips["documents"],
            },
        }


def _named_shards(specs: str | list[str]) -> tuple[list[str], list[str]]:
    """(shards that exist, named shards that do not). A path, glob, folder or brace alternative
    that names no shard is a failure: a dataset with holes is not the dataset the user meant to
    train on (a glob or an empty folder beside other specs is never skipped without a word).
    Only specs that name nothing at all are a usage error."""
    unmatched: list[str] = []
    named = expand_specs(
        specs, folder_suffix=".tar", keep_missing=True, unmatched=unmatched, unique=False
    )
    exists = [remote.exists(p) if remote.is_remote(p) else os.path.exists(p) for p in named]
    present = [p for p, ok in zip(named, exists, strict=True) if ok]
    if not present:
        raise SpecError(f"no shard matches {specs!r}")
    return present, [p for p, ok in zip(named, exists, strict=True) if not ok] + unmatched


@dataclass(frozen=True, slots=True)
class ValidateOptions:
    deep: bool = False
    kind: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ShardCheck:
    """One shard's part of the report, its sample count (None: the shard itself is unreadable)
    and its keys in reading order, for the duplicate-key check across shards."""

    report: ValidationReport
    count: int | None
    keys: list[str]


def validate_shards(
    specs: str | list[str],
    *,
    deep: bool = False,
    kind: str = "auto",
    write_sizes: bool = False,
    sizes_path: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    processes: int = 1,
    progress: bool = False,
) -> ValidationReport:
    """Validate every shard named by ``specs`` (brace patterns, globs, folders), ``processes``
    shards at a time; the report is the same for any ``processes``. ``progress``: a bar of shards
    done on stderr, counting each shard as it finishes."""
    if processes < 1:
        raise InputError("`processes` must be at least 1")
    paths, missing = _named_shards(specs)
    _check_sizes_target(paths, write_sizes, sizes_path)
    options = ValidateOptions(deep=deep, kind=kind, max_pixels=max_pixels)
    report = ValidationReport()
    for path in missing:
        name = os.path.basename(path.rstrip("/")) or path
        report.failures.append(Failure(name, "", "missing_shard", path))
    keys = KeyIndex()
    counts: dict[str, int | None] = {}  # by path: two folders may hold shards of the same name
    checks = _checked_shards(paths, options, processes, progress)
    for path, shard in zip(paths, checks, strict=True):
        report.merge(shard.report)
        keys.start_shard()
        for key in shard.keys:
            keys.add(key)
        counts[path] = shard.count
        if shard.count is not None:
            report.sizes[os.path.basename(path)] = shard.count
    _report_duplicate_keys(keys, paths, report)
    _check_sizes(counts, report, write_sizes, sizes_path)
    _check_stats(paths, report)
    return report


def _checked_shards(
    paths: list[str], options: ValidateOptions, processes: int, progress: bool
) -> Iterator[ShardCheck]:
    """Each shard's check, in the order of ``paths``; the bar counts shards as they finish."""
    with tqdm(total=len(paths), unit="shard", desc="validate", disable=not progress) as bar:
        if processes == 1 or len(paths) == 1:
            for path in paths:
                yield check_shard(path, options)
                bar.update(1)
            return
        task = partial(_numbered_check, options=options)
        finished = map_in_processes(task, list(enumerate(paths)), processes)
        yield from _in_input_order(finished, bar)


def _numbered_check(item: tuple[int, str], options: ValidateOptions) -> tuple[int, ShardCheck]:
    return item[0], check_shard(item[1], options)


def _in_input_order(finished: Iterator[tuple[int, ShardCheck]], bar: tqdm) -> Iterator[ShardCheck]:
    """The checks in input order from (position, check) pairs in the order they finish; each
    arrival ticks ``bar``."""
    waiting: dict[int, ShardCheck] = {}
    next_position = 0
    for position, check in finished:
        bar.update(1)
        waiting[position] = check
        while next_position in waiting:
            yield waiting.pop(next_position)
            next_position += 1


def check_shard(path: str, options: ValidateOptions) -> ShardCheck:
    """Every check of one shard that needs no other shard."""
    shard, report = os.path.basename(path), ValidationReport(shards=1)
    shard_broken, keys = False, []

    def on_issue(issue: ReadIssue) -> None:
        nonlocal shard_broken
        shard_broken = shard_broken or not issue.key
        report.failures.append(Failure(shard, issue.key, issue.reason, issue.detail))

    for sample in iter_samples(path, on_issue, read=DECODED_EXTS):
        report.samples += 1
        keys.append(sample.key)
        for reason, detail in check_sample(sample, options, report):
            report.failures.append(Failure(shard, sample.key, reason, detail))
    if not keys and not report.failures:  # only an end-of-archive block
        report.failures.append(Failure(shard, "", "empty_tar", "no samples"))
    return ShardCheck(report, None if shard_broken else len(keys), keys)


def _report_duplicate_keys(keys: KeyIndex, paths: list[str], report: ValidationReport) -> None:
    """``duplicate_key`` for each sample whose key an earlier sample had, in any shard."""

    def read_keys(shard: int) -> Iterator[str]:  # names only: no member's bytes are read
        return (s.key for s in iter_samples(paths[shard], lambda issue: None, read=frozenset()))

    for shard, key in keys.duplicates(read_keys):
        report.failures.append(Failure(os.path.basename(paths[shard]), key, "duplicate_key"))


def check_sample(
    sample: Sample, options: ValidateOptions, report: ValidationReport
) -> list[tuple[str, str]]:
    """(reason, detail) for everything wrong with one sample; empty when it is fit for training."""
    if "json" not in sample.members:
        return [("missing_json", ", ".join(sorted(sample.members)))]
    try:
        record = parse_record(sample.members["json"])
    except (ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8, a 5000-digit int
        return [("bad_json", str(exc)[:200])]
    kind = record_kind(record) if options.kind == "auto" else options.kind
    report.kinds[kind] += 1
    problems = _member_problems(sample, kind)
    errors = schema_errors(kind, record)
    if errors:
        return problems + [("schema", "; ".join(errors))]
    checker = {"interleaved": _check_interleaved, "gpt": _check_gpt, "pair": _check_pair}[kind]
    return problems + checker(record, sample, options, report)


def parse_record(raw: bytes) -> Any:
    """The record as ``json.loads`` (upstream's parser) reads it, refused (ValueError) where it
    and orjson (the loader's) disagree or either fails: NaN/Infinity (the image matching raises
    on them), numbers beyond a double (``1e400``: infinity here, an error there), integers beyond
    64 bits (a float there, a changed value) and lone surrogates (the tokenizer raises), as the
    shard writer refuses or counts them, instead of passing here and stopping a training run."""
    record = json.loads(
        raw, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_int_64
    )
    orjson.loads(raw)
    return record


# the integers orjson reads as integers (and writes); beyond them it reads a float
INT_RANGE = range(-(2**63), 2**64)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_clip(text, 40)} is beyond a double's range (infinity)")
    return value


def _int_64(text: str) -> int:
    """The integer, when orjson reads the same one; digits are counted first, since ``int``
    refuses over 4300 of them."""
    if len(text.lstrip("-")) > 20 or (value := int(text)) not in INT_RANGE:
        raise ValueError(
            f"integer {_clip(text, 40)} is beyond 64 bits (the loader would read a float)"
        )
    return value


def _member_problems(sample: Sample, kind: str) -> list[tuple[str, str]]:
    allowed = {"json"} if kind in ("interleaved", "gpt") else {"json", "txt", *IMAGE_EXTS}
    extra = sorted(set(sample.members) - allowed)
    return [("unexpected_member", ext) for ext in extra]


def _check_image_b64(
    text: str, options: ValidateOptions, report: ValidationReport
) -> tuple[str, str] | None:
    try:
        data = decode_base64(text)
    except (binascii.Error, ValueError) as exc:
        return ("bad_base64", str(exc)[:100])
    return _check_image_bytes(data, options, report)


def _check_image_bytes(
    data: bytes, options: ValidateOptions, report: ValidationReport
) -> tuple[str, str] | None:
    report.images += 1
    fmt = sniff_format(data)
    if fmt not in ("jpeg", "png", "webp"):
        return ("not_an_image", f"sniffed {fmt}")
    if options.deep:
        try:
            decode_at_least(data, LOADER_IMAGE_SIZE, options.max_pixels)
        except Exception as exc:  # any decode failure means the same: the loader cannot use it
            if exc.args == ("too_many_pixels",):
                return ("too_many_pixels", "")
            return ("undecodable_image", f"{type(exc).__name__}: {exc}"[:200])
    return None


def _check_interleaved(
    record: dict, sample: Sample, options: ValidateOptions, report: ValidationReport
):
    problems = []
    n_images, n_sentences = len(record["image_info"]), len(record["text_list"])
    matrix = record["similarity_matrix"]
    if len(matrix) != n_images or any(len(row) != n_sentences for row in matrix):
        shape = f"{len(matrix)}x{len(matrix[0]) if matrix else 0}"
        problems.append(("bad_matrix_shape", f"{shape}, want {n_images}x{n_sentences}"))
    with_bytes = []
    for i, info in enumerate(record["image_info"]):
        if info["matched_text_index"] >= n_sentences:
            problems.append(
                ("index_out_of_range", f"image {i}: {info['matched_text_index']} >= {n_sentences}")
            )
        if "image_base64" in info:
            with_bytes.append(info["image_base64"])
            if (problem := _check_image_b64(info["image_base64"], options, report)) is not None:
                problems.append((problem[0], f"image {i}: {problem[1]}"))
    if not with_bytes:
        problems.append(("no_images", "no image_info entry has image_base64"))
    roles = record.get("text_roles")
    if roles is not None and len(roles) != n_sentences:
        problems.append(("bad_roles", f"{len(roles)} text_roles for {n_sentences} sentences"))
    if not problems:
        _count_open_flamingo_skips(with_bytes, report)
    return problems


def _count_open_flamingo_skips(images_base64: list[str], report: ValidationReport) -> None:
    small = sum(_base64_size(text) < OPEN_FLAMINGO_MIN_IMAGE_BYTES for text in images_base64)
    report.open_flamingo_skips["images"] += small
    report.open_flamingo_skips["documents"] += small == len(images_base64)


def _base64_size(text: str) -> int:
    """Decoded length of strict (already checked) base64, without decoding it again."""
    return len(text) // 4 * 3 - (len(text) - len(text.rstrip("=")))


def _check_gpt(record: dict, sample: Sample, options: ValidateOptions, report: ValidationReport):
    problems = []
    # compared as text, as the loader looks them up: _!_IMAGE01_!_ is not _!_IMAGE1_!_ (and
    # int() refuses a number over 4300 digits, which the schema's pattern allows)
    placed = [m.group(0) for m in PLACEHOLDER.finditer(record["example"])]
    names = set(record["image_map"])
    if set(placed) != names:
        problems.append(
            (
                "placeholder_mismatch",
                _clip(f"text has {sorted(set(placed))}, image_map has {sorted(names)}"),
            )
        )
    elif names != {f"_!_IMAGE{n}_!_" for n in range(1, len(names) + 1)}:
        numbers = sorted(
            (PLACEHOLDER.fullmatch(n).group(1) for n in names), key=lambda d: (len(d), d)
        )
        problems.append(("placeholder_numbering", _clip(f"{numbers} is not 1..{len(names)}")))
    if len(placed) != len(set(placed)):
        problems.append(("placeholder_repeated", _clip(str(sorted(placed)))))
    size = len(record["example"])
    for role, start, end in record.get("role_spans", []):  # the schema holds their shape
        if not 0 <= start <= end <= size:
            problems.append(("bad_roles", f"{role} span {start}..{end} in {size} characters"))
            break
    for name in sorted(names):
        if (
            problem := _check_image_b64(record["image_map"][name]["base64_image"], options, report)
        ) is not None:
            problems.append((problem[0], f"{name}: {problem[1]}"))
    return problems


def _clip(detail: str, limit: int = 200) -> str:
    return detail if len(detail) <= limit else detail[: limit - 1] + "…"


def _check_pair(record: dict, sample: Sample, options: ValidateOptions, report: ValidationReport):
    problems = []
    image_exts = [ext for ext in IMAGE_EXTS if ext in sample.members]
    if not image_exts:
        problems.append(("missing_image", ", ".join(sorted(sample.members))))
    elif (
        problem := _check_image_bytes(sample.members[image_exts[0]], options, report)
    ) is not None:
        problems.append(problem)
    if "txt" not in sample.members:
        problems.append(("missing_caption", ""))
    else:
        try:
            sample.members["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(("caption_not_utf8", str(exc)[:100]))
    return problems


def _sizes_target(folder: str, sizes_path: str | None) -> str:
    return sizes_path or remote.join(folder, "sizes.json")


def _check_sizes_target(paths: list[str], write: bool, sizes_path: str | None) -> None:
    if sizes_path is not None and (clash := _same_name_elsewhere(paths)):
        raise SizesFileError(
            f"`sizes_path` {sizes_path}: one file cannot hold the counts of {clash[0]} and {clash[1]}"
            " (sizes.json is keyed by file name); validate each folder on its own"
        )
    if not write:
        if sizes_path is not None and not remote.exists(sizes_path):
            raise SizesFileError(
                f"`sizes_path` {sizes_path} does not exist (`write_sizes` writes it)"
            )
        return
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        target = _sizes_target(folder, sizes_path)
        if not remote.is_remote(target) and (problem := _unwritable(target)):
            raise SizesFileError(f"cannot write {target}: {problem}")


def _same_name_elsewhere(paths: list[str]) -> tuple[str, str] | None:
    """Two shards of one name in different folders: one ``--sizes`` file would keep one count for
    both (the last written won), a wrong epoch length for the other without a word."""
    first: dict[str, str] = {}
    for path in paths:
        path = path if remote.is_remote(path) else os.path.normpath(path)
        name = os.path.basename(path)
        if first.setdefault(name, path) != path:
            return first[name], path
    return None


def _unwritable(target: str) -> str | None:
    """Why a local sizes.json cannot be written atomically (a temporary beside it, then a rename)."""
    parent = os.path.dirname(target) or "."
    if os.path.isdir(target):
        return "it is a folder"
    if not os.path.isdir(parent):
        return f"no folder {parent}"
    return None if os.access(parent, os.W_OK) else f"folder {parent} is not writable"


def _check_sizes(
    counts: dict[str, int | None], report: ValidationReport, write: bool, sizes_path: str | None
) -> None:
    """Compare with (or write) sizes.json in each folder holding shards."""
    folders = sorted({os.path.dirname(p) or "." for p in counts})
    for folder in folders:
        target = _sizes_target(folder, sizes_path)
        here = {
            os.path.basename(p): count
            for p, count in counts.items()
            if (os.path.dirname(p) or ".") == folder
        }
        if write:
            _write_sizes(target, here)
        elif (raw := remote.read_if_exists(target)) is not None:
            _compare_sizes(posixpath.basename(target), raw, here, report)


def _write_sizes(target: str, here: dict[str, int | None]) -> None:
    sizes = _existing_sizes(remote.read_if_exists(target))
    sizes.update({name: count for name, count in here.items() if count is not None})
    remote.write_file(target, json.dumps(dict(sorted(sizes.items())), indent=1).encode())


def _existing_sizes(raw: bytes | None) -> dict[str, Any]:
    """The entries to keep when rewriting sizes.json; a malformed one is replaced (the loader
    ignores it too) rather than stopping ``--write-sizes`` with a traceback."""
    try:
        sizes = json.loads(raw) if raw is not None else {}
    except (ValueError, RecursionError):
        return {}
    return sizes if isinstance(sizes, dict) else {}


def _compare_sizes(
    name: str, raw: bytes, here: dict[str, int | None], report: ValidationReport
) -> None:
    try:
        sizes = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        report.failures.append(Failure(name, "", "bad_sizes_json", str(exc)[:200]))
        return
    if errors := schema_errors("sizes", sizes) or _not_integers(sizes):
        report.failures.append(Failure(name, "", "sizes_schema", "; ".join(errors)))
        return
    for name, count in here.items():
        if name not in sizes:
            report.failures.append(Failure(name, "", "missing_from_sizes_json"))
        elif count is not None and sizes[name] != count:
            report.failures.append(
                Failure(
                    name, "", "count_mismatch", f"sizes.json says {sizes[name]}, shard has {count}"
                )
            )


def _not_integers(sizes: dict[str, Any]) -> list[str]:
    """JSON Schema's integer includes 6.0; the loader takes only a JSON integer as a count and
    leaves the epoch length unknown otherwise (resampling then refuses to start)."""
    return [
        f"{shard}: {count!r} is not a JSON integer"
        for shard, count in sizes.items()
        if not isinstance(count, int)
    ][:3]


def _check_stats(paths: list[str], report: ValidationReport) -> None:
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):
        raw = remote.read_if_exists(remote.join(folder, "stats.json"))
        if raw is None:
            continue
        try:
            errors = schema_errors("stats", json.loads(raw))
        except (ValueError, RecursionError) as exc:
            errors = [str(exc)[:200]]
        if errors:
            report.failures.append(Failure("stats.json", "", "stats_schema", "; ".join(errors)))
