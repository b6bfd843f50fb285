"""ChatGPT-generated sequences -> GPT records with embedded images.

Every distinct image url is downloaded once with img2dataset (original bytes kept), or joined from an
existing img2dataset output (``images_from``). Placeholders and ``image_map`` must agree and be
numbered 1..n. A sequence missing an image is dropped (default) or, with ``missing="strip"``, loses
that placeholder and the rest are renumbered contiguously: never a hole the loader would trip on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from flamingo_data.converters.jsonchunks import nonblank_lines, one_object
from flamingo_data.converters.mmc4 import unit_stem
from flamingo_data.core.extras import require_extra
from flamingo_data.core.records import GptImage, GptSequence, RecordEncodingError, encode_record
from flamingo_data.core.schema import schema_errors
from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError
from flamingo_data.fetch.i2d_output import (
    ImageStore,
    require_output,
)
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.fetch.url_images import UrlImages, UrlListChanged, fetch_url_images
from flamingo_data.fetch.web import is_web_url
from flamingo_data.images.stage import ImagePolicy, ImageResult, process_image
from flamingo_data.run.driver import ConversionPlan, run_conversion
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import (
    OutputExistsError,
    RunOptions,
    Unit,
    UnitContext,
    all_done,
    duplicate_inputs,
    earlier_work,
    unit_names,
    work_dir,
)
from flamingo_data.storage import remote
from flamingo_data.storage.specs import SpecError, expand_specs

URL_KEYS = ("url", "raw_url", "image_url", "URL")
PLACEHOLDER = re.compile(r"_!_IMAGE(\d+)_!_")
SPACED_PLACEHOLDER = re.compile(r"([ \t]*)_!_IMAGE(\d+)_!_([ \t]*)")  # with the spaces around it
# the loader's own tokens: text holding one would bind an image where no placeholder was
SPECIAL_TOKENS = ("<image>", "<|endofchunk|>", "<|endoftext|>")


class SequenceError(ValueError):
    """A sequence that cannot be written; ``args[0]`` is the reason."""


@dataclass(frozen=True)
class ChatGptOptions:
    url_key: str = "auto"
    images_from: str | None = None
    missing: str = "drop"
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    download: DownloadOptions = field(default_factory=DownloadOptions)


def read_sequences(path: str) -> list[Any]:
    """A JSON array, one pretty-printed object (one sequence, not one bad_json per line), or JSONL
    (an undecodable line becomes a SequenceError item, counted later)."""
    text = remote.read_bytes(path).decode("utf-8-sig")  # a byte-order mark is not part of the JSON
    if text.lstrip().startswith("["):
        return json.loads(text)
    if (whole := one_object(text)) is not None:
        return [whole]
    items: list[Any] = []
    for line in nonblank_lines(text):
        try:
            items.append(json.loads(line))
        except (ValueError, RecursionError):  # also a >4300-digit integer, deep nesting
            items.append(SequenceError("bad_json"))
    return items


def entry_url(entry: Any, url_key: str) -> str | None:
    if not isinstance(entry, dict):
        return None
    keys = URL_KEYS if url_key == "auto" else (url_key,)
    return next((entry[k] for k in keys if isinstance(entry.get(k), str) and entry[k]), None)


def check_placeholders(sequence: Any) -> list[int]:
    """The placeholder numbers, in ascending order, when text and image_map agree on 1..n."""
    if (
        not isinstance(sequence, dict)
        or not isinstance(sequence.get("example"), str)
        or not isinstance(sequence.get("image_map"), dict)
    ):
        raise SequenceError("bad_record")
    if any(token in sequence["example"] for token in SPECIAL_TOKENS):
        raise SequenceError("special_token_in_text")
    placed = [m.group(0) for m in PLACEHOLDER.finditer(sequence["example"])]
    numbered = [f"_!_IMAGE{n}_!_" for n in range(1, len(set(placed)) + 1)]
    # compared as text, as validate and the loader look them up: _!_IMAGE01_!_ is not _!_IMAGE1_!_
    if set(placed) != set(numbered) or set(sequence["image_map"]) != set(numbered):
        raise SequenceError("placeholder_mismatch")
    if len(placed) != len(numbered):
        raise SequenceError("placeholder_repeated")
    if not numbered:
        raise SequenceError("no_images")
    return list(range(1, len(numbered) + 1))


def collect_urls(paths: list[str], url_key: str) -> list[str]:
    urls = set()
    for path in paths:
        try:
            items = read_sequences(path)
        except (OSError, ValueError, RecursionError):  # counted when its unit runs
            continue
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("image_map"), dict):
                urls.update(
                    u
                    for e in item["image_map"].values()
                    if (u := entry_url(e, url_key)) and is_web_url(u)
                )
    return sorted(urls)


def build_record(
    sequence: dict[str, Any],
    numbers: list[int],
    store: ImageStore,
    options: ChatGptOptions,
    ctx: UnitContext,
    key: str,
) -> tuple[dict[str, Any], list[str]]:
    """Embed every image; drop or strip missing ones; number the rest 1..n in text order; raises
    SequenceError. Returns the record and its images' outcomes in the image stage (counted only
    once the record is written)."""
    found: dict[int, tuple[dict[str, Any], ImageResult]] = {}
    for n in numbers:
        entry = sequence["image_map"][f"_!_IMAGE{n}_!_"]
        url = entry_url(entry, options.url_key)
        if url is None or not is_web_url(url):  # file://, ftp://, data: are never fetched
            reason, result = ("no_url" if url is None else "bad_url"), None
        else:
            reason, result = _image(store, url, options.policy)
        if result is None:
            ctx.reject("images", f"{key}/{n}", reason, url=url or "")
            if options.missing == "drop":
                raise SequenceError(f"image_{reason}")
            continue
        found[n] = (entry, result)
    if not found:
        raise SequenceError("no_images")
    # numbered in text order: open_flamingo binds image k to the k-th placeholder of the text, so
    # "_!_IMAGE2_!_ ... _!_IMAGE1_!_" gave each of them the other's image
    in_text = [int(m.group(1)) for m in PLACEHOLDER.finditer(sequence["example"])]
    renumbered = {old: new for new, old in enumerate((n for n in in_text if n in found), start=1)}
    image_map = {
        f"_!_IMAGE{renumbered[n]}_!_": GptImage(
            image_bytes=found[n][1].data,
            extra={k: v for k, v in found[n][0].items() if k != "base64_image"},
        )
        for n in renumbered
    }
    example = renumber(sequence["example"], renumbered)
    extra = {k: v for k, v in sequence.items() if k not in ("example", "image_map", "is_gpt")}
    record = GptSequence(example=example, image_map=image_map, extra=extra).to_json()
    return record, [found[n][1].outcome for n in sorted(found)]


def renumber(example: str, renumbered: dict[int, int]) -> str:
    """Placeholders renumbered in one pass (no sentinel the text itself could hold). A stripped one
    takes the spaces around it along, leaving one space between words and none at the start or end
    of a line; every other character of the text is left as it was."""

    def replace(match: re.Match[str]) -> str:
        new = renumbered.get(int(match.group(2)))
        if new is not None:
            return f"{match.group(1)}_!_IMAGE{new}_!_{match.group(3)}"
        before, after = example[match.start() - 1 : match.start()], example[match.end() :][:1]
        at_edge = not before.strip() or not after.strip()  # text or line edge, or spaces kept
        return "" if at_edge or not (match.group(1) or match.group(3)) else " "

    return SPACED_PLACEHOLDER.sub(replace, example)


def _image(store: ImageStore, url: str, policy: ImagePolicy) -> tuple[str, ImageResult | None]:
    """("", the accepted result) or (why there is none, None)."""
    data, reason = store.get(url, policy.max_bytes + 1)  # more: too_many_bytes
    if data is None:
        return reason, None
    result = process_image(data, policy)
    return (result.reason or "rejected", None) if not result.ok else ("", result)


def convert_unit(unit: Unit, ctx: UnitContext, options: ChatGptOptions, images: str) -> None:
    store = ImageStore(images)
    try:
        items = read_sequences(unit.source)
    except (OSError, ValueError, RecursionError) as exc:  # a JSON array nested too deeply
        ctx.reject("units", unit.name, "unreadable_json", str(exc))
        return
    for index, item in enumerate(items):
        convert_sequence(item, f"{unit.name}-{index:07d}", store, options, ctx)


def convert_sequence(
    item: Any, key: str, store: ImageStore, options: ChatGptOptions, ctx: UnitContext
) -> None:
    """One sequence -> one written record or one counted reject; its images' lines in
    ``rejects.jsonl`` say which it was."""
    since = len(ctx.rejects)
    written = _convert_sequence(item, key, store, options, ctx)
    ctx.settle_images(since, "written" if written else "rejected")


def _convert_sequence(
    item: Any, key: str, store: ImageStore, options: ChatGptOptions, ctx: UnitContext
) -> bool:
    ctx.stats.add("documents", "in")
    try:
        if isinstance(item, SequenceError):
            raise item
        record, outcomes = build_record(item, check_placeholders(item), store, options, ctx, key)
        if errors := schema_errors("gpt", record):
            raise SequenceError("schema", "; ".join(errors))
        encoded = encode_record(record)
    except (SequenceError, RecordEncodingError) as exc:
        ctx.reject("documents", key, exc.args[0])
        return False
    ctx.write_record(key, encoded)
    ctx.stats.add("documents", "written")
    ctx.stats.add("images", "embedded", len(record["image_map"]))  # only images that were written
    for outcome in outcomes:  # kept, trimmed, converted or resized
        ctx.stats.add("images", outcome)
    return True


def _download(urls: list[str], images: str, options: DownloadOptions, progress: bool) -> None:
    """Each distinct url once, resumable without fetching a url again (``fetch_url_images``). A
    shard img2dataset could not finish stops the run (RunIncomplete): its urls would otherwise be
    ``not_downloaded``, and the units committed with those losses would be skipped by --resume."""
    try:
        fetch_url_images(urls, UrlImages(images, download=options), progress=progress)
    except UrlListChanged as exc:
        raise OutputExistsError(
            f"the sequence files name other image urls than the interrupted run did ({exc.new} "
            f"new, {exc.gone} gone): its downloads would miss the new ones; pass `overwrite`"
        ) from None


def convert_chatgpt(
    specs: str | list[str],
    options: ChatGptOptions,
    run: RunOptions,
    *,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Download (or join) every image, then one unit per sequence file; returns the merged stats.
    Downloading (no ``options.images_from``) needs the [download] extra: without it MissingExtra
    is raised before anything is written."""
    plan = plan_chatgpt(specs, options, run, overwrite)
    return run_conversion(plan, run, overwrite=overwrite, execution=execution)


def plan_chatgpt(
    specs: str | list[str], options: ChatGptOptions, run: RunOptions, overwrite: bool
) -> ConversionPlan:
    """One unit per sequence file; the images are downloaded first (``before``) into the local
    work folder, kept until the run succeeds, or joined from ``options.images_from``. A --resume
    whose every unit is done downloads nothing: the run finished, and its downloads are gone."""
    if options.missing not in ("drop", "strip"):
        raise InputError(f"missing must be drop or strip, not {options.missing!r}")
    if options.images_from is None:
        require_extra("download", "convert_chatgpt without options.images_from")
    unmatched: list[str] = []
    duplicates: list[str] = []
    # a folder gives its .json and .jsonl files: sequence files may be JSON or JSONL
    sources = expand_specs(
        specs, folder_suffix=(".json", ".jsonl"), unmatched=unmatched, duplicates=duplicates
    )
    if not sources:
        raise SpecError(f"no sequence file matches {specs!r}")
    if unmatched:  # beside files that exist: a mistyped one is not skipped without a word
        raise SpecError(f"{unmatched[0]} names no sequence file (.json or .jsonl)")
    if options.images_from is not None:
        require_output(options.images_from, "images_from")
    work = work_dir(run.out_dir)  # downloads stay local; a remote --out gets only shards + sidecars
    if earlier_work(run.out_dir, "_images") and not (run.resume or overwrite):
        raise OutputExistsError(f"{run.out_dir} holds an earlier run: pass `resume` or `overwrite`")
    images = options.images_from or str(work / "_images")
    units = unit_names(sources, unit_stem)

    def download(run: RunOptions, overwrite: bool) -> None:
        finished = run.resume and all_done(run.out_dir, (unit.name for unit in units))
        if options.images_from is None and not finished:
            _download(
                collect_urls(sources, options.url_key), images, options.download, run.progress
            )

    return ConversionPlan(
        converter="chatgpt",
        settings={"url_key": options.url_key, "missing": options.missing, "policy": options.policy},
        units=lambda run: units,
        convert_unit=partial(convert_unit, options=options, images=images),
        input_counts=duplicate_inputs(duplicates, "chatgpt"),
        before=download,
    )
