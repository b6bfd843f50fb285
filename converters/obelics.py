"""OBELICS-style interleaved documents + images by url -> interleaved (MMC4-form) shards with
embedded base64 images.

One unit per document file (``.parquet``, ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``); each document
becomes one record keyed ``<unit>-<row or line number>`` or a counted, reasoned reject (see
``obelics_docs`` for the record). Images are read by url from an img2dataset output
(``options.images.folder``), downloaded there first when ``options.images.download`` is set: each
distinct http(s) url once; any other url is ``bad_url`` and never fetched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from flamingo_data.converters.downloads import DownloadStep
from flamingo_data.converters.mmc4 import MAX_LINE_BYTES
from flamingo_data.converters.obelics_docs import (
    Document,
    DocumentError,
    check_document,
    interleaved_record,
)
from flamingo_data.converters.obelics_read import (
    Item,
    document_stem,
    is_document_file,
    unit_items,
)
from flamingo_data.core.extras import require_extra
from flamingo_data.core.records import RecordEncodingError, encode_record
from flamingo_data.core.stats import Stats
from flamingo_data.fetch.i2d_output import require_output
from flamingo_data.fetch.url_images import UrlImages, UrlStore, url_store
from flamingo_data.fetch.web import is_web_url
from flamingo_data.images.stage import ImagePolicy, process_image
from flamingo_data.run.driver import ConversionPlan, run_conversion
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions, Unit, UnitContext, unit_names
from flamingo_data.storage.specs import SpecError, expand_specs

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass(frozen=True, slots=True)
class ObelicsOptions:
    """Where the images are (and whether to download them first) and what to keep."""

    images: UrlImages
    keep_docs_without_images: bool = False
    drop_docs_with_missing_images: bool = False
    policy: ImagePolicy = field(default_factory=ImagePolicy)


def convert_unit(unit: Unit, ctx: UnitContext, options: ObelicsOptions) -> None:
    """Convert every document of one file; a file that cannot be read is a unit reject."""
    store = url_store(options.images.folder)
    for key, item in unit_items(unit, ctx):
        since = len(ctx.rejects)
        written = convert_document(item, key, store, ctx, options)
        ctx.settle_images(since, "written" if written else "rejected")


def convert_document(
    item: Item, key: str, store: UrlStore, ctx: UnitContext, options: ObelicsOptions
) -> bool:
    """One document -> one written record (True) or one counted reject; its images not embedded
    are listed for ``rejects.jsonl``."""
    ctx.stats.add("documents", "in")
    try:
        if item is None:
            raise DocumentError("line_too_long", f"over {MAX_LINE_BYTES} bytes")
        if isinstance(item, DocumentError):
            raise item
        doc = check_document(item)
        ctx.stats.add("images", "in", len(doc.images))
        kept = attach_images(doc, key, store, ctx, options.policy)
        _check_kept(doc, kept, options)
        encoded = encode_record(interleaved_record(doc, kept))
    except (DocumentError, RecordEncodingError) as exc:
        ctx.reject("documents", key, exc.args[0], " ".join(exc.args[1:2]))
        return False
    ctx.write_record(key, encoded)
    ctx.stats.add("documents", "written")
    return True


def _check_kept(doc: Document, kept: dict[int, bytes], options: ObelicsOptions) -> None:
    """DocumentError when the images kept are too few for ``options``."""
    if not kept and not options.keep_docs_without_images:
        detail = f"none of its {len(doc.images)} images kept" if doc.images else "no image in it"
        raise DocumentError("no_images", detail)
    if len(kept) < len(doc.images) and options.drop_docs_with_missing_images:
        raise DocumentError("missing_images", f"{len(kept)} of {len(doc.images)} images kept")


def attach_images(
    doc: Document, key: str, store: UrlStore, ctx: UnitContext, policy: ImagePolicy
) -> dict[int, bytes]:
    """position -> the bytes the image stage accepted, for each image found; each image not kept is
    rejected with the store's reason (``not_downloaded``, ``http_404``...), ``bad_url`` or the
    image stage's."""
    kept = {}
    for image in doc.images:
        image_key = f"{key}/{image.position}"
        if not is_web_url(image.url):
            ctx.reject("images", image_key, "bad_url", url=image.url[:500])
            continue
        data, reason = store.get(image.url, policy.max_bytes + 1)  # more: too_many_bytes
        if data is None:
            ctx.reject("images", image_key, reason, url=image.url)
            continue
        result = process_image(data, policy)
        if not result.ok:
            ctx.reject("images", image_key, result.reason or "rejected", url=image.url)
            continue
        ctx.stats.add("images", "found")
        ctx.stats.add("images", result.outcome)
        kept[image.position] = result.data
    return kept


def unit_image_urls(unit: Unit) -> Iterator[str]:
    """Every image url (a string) of the unit's documents; documents and files that cannot be
    read give none (the conversion counts them)."""
    for _key, item in unit_items(unit, _discarding(unit)):
        images = item.get("images") if isinstance(item, dict) else None
        if isinstance(images, list):
            yield from (url for url in images if isinstance(url, str))


def _discarding(unit: Unit) -> UnitContext:
    """A context for the url pass, which writes nothing: its rejects are counted when the unit runs."""
    return UnitContext(unit=unit, writer=None, stats=Stats(converter="obelics"))  # type: ignore[arg-type]


def convert_obelics(
    docs: str | list[str],
    options: ObelicsOptions,
    run: RunOptions,
    *,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Convert OBELICS-style document files into interleaved shards in ``run.out_dir``; returns
    the merged stats. Downloading (``options.images.download``) needs the [download] extra:
    without it MissingExtra is raised before anything is written."""
    plan = plan_obelics(docs, options)
    return run_conversion(plan, run, overwrite=overwrite, execution=execution)


def plan_obelics(docs: str | list[str], options: ObelicsOptions) -> ConversionPlan:
    """One unit per document file, inputs checked here; before the units run (``DownloadStep``),
    every distinct http(s) url is fetched into the image folder when ``options.images.download``
    is set, and the urls are counted by outcome (``urls``)."""
    source = options.images
    if source.download is not None:
        require_extra("download", "convert_obelics with `images` download")
    sources, duplicates = _document_files(docs)
    units = unit_names(sources, document_stem)
    if source.download is None:
        _check_image_folder(source.folder)
    counts = Stats(converter="obelics")
    if duplicates:
        counts.add("units", "duplicate_input", len(duplicates))
    return ConversionPlan(
        converter="obelics",
        settings={
            "keep_docs_without_images": options.keep_docs_without_images,
            "drop_docs_with_missing_images": options.drop_docs_with_missing_images,
            "policy": options.policy,
        },
        units=lambda run: units,
        convert_unit=partial(convert_unit, options=options),
        input_counts=counts,
        before=DownloadStep(units, unit_image_urls, source, counts),
    )


def _document_files(docs: str | list[str]) -> tuple[list[str], list[str]]:
    """The document files ``docs`` names (brace patterns, globs, folders), each once, and the
    names given again; SpecError when one of them names nothing or a file of another kind."""
    unmatched: list[str] = []
    duplicates: list[str] = []
    sources = expand_specs(
        docs, folder_suffix=SUFFIXES, unmatched=unmatched, ignore_case=True, duplicates=duplicates
    )
    if unmatched:
        raise SpecError(f"{unmatched[0]} names no document file (`docs`)")
    if not sources:
        raise SpecError(f"no document file matches `docs` {docs!r}")
    if other := next((s for s in sources if not is_document_file(s)), None):
        raise SpecError(f"{other} is not a {', '.join(SUFFIXES)} file (`docs`)")
    return sources, duplicates


def _check_image_folder(folder: str) -> None:
    """A mistyped folder would drop every document as not_downloaded: refuse it instead."""
    hint = ": give an img2dataset output, or pass `download` to fetch the images into it"
    require_output(folder, "images", hint)
