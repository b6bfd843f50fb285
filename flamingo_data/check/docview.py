"""What the loader will make of one shard sample, without decoding pixels: shared by inspect and preview."""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flamingo_data.core.records import decode_base64
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.gpt import PLACEHOLDER, plan_gpt
from flamingo_data.loader.interleaved import Dropped, Reject, plan_interleaved, shape_problem
from flamingo_data.loader.record import parse_json
from flamingo_data.storage.shard_reader import (
    DECODED_EXTS,
    IMAGE_EXTS,
    ReadIssue,
    Sample,
    iter_samples,
)
from flamingo_data.storage.specs import SpecError, expand_specs


@dataclass
class ImageView:
    """One image as the loader sees it: kept (with its sentence/placeholder) or dropped (with why)."""

    index: int
    data: bytes | None
    kept: bool
    where: int | None = None
    similarity: float | None = None  # with the sentence the assignment gave it, when it got one
    reason: str | None = None
    name: str = ""
    best: tuple[int, float, int | None] | None = None  # (sentence, similarity, image it went to)


@dataclass
class DocView:
    """A sample's kind, its text pieces and its images, plus why the loader would reject it (if it would)."""

    key: str
    shard: str
    kind: str
    texts: list[str] = field(default_factory=list)
    images: list[ImageView] = field(default_factory=list)
    rejected: str | None = None
    record: dict[str, Any] | None = None


def iter_docs(
    specs: str | list[str], config: LoaderConfig, issues: list[ReadIssue] | None = None
) -> Iterator[DocView]:
    """DocViews for every sample of the shards, in order."""
    paths = expand_specs(specs, folder_suffix=".tar", unique=False)
    if not paths:
        raise SpecError(f"no shard matches {specs!r}")
    return iter_path_docs(paths, config, issues)


def iter_path_docs(
    paths: list[str], config: LoaderConfig, issues: list[ReadIssue] | None = None
) -> Iterator[DocView]:
    """DocViews for every sample of already-expanded shard paths: expanding them again would
    take a folder named ``x.tar`` among them for a folder of shards and drop it unreported."""
    sink = issues.append if issues is not None else (lambda issue: None)
    for path in paths:
        for sample in iter_samples(path, sink, read=DECODED_EXTS):
            yield view_sample(sample, config)


def view_sample(sample: Sample, config: LoaderConfig) -> DocView:
    """The loader's dispatch and reasons (``preprocess``): a sample without json or image is
    ``missing_json``, a record neither GPT nor interleaved ``unknown_record_kind``, a pair without
    a UTF-8 caption ``missing_caption`` / ``bad_caption``. They all read as kept, or as bad_json /
    bad_record, before."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in sample.members), None)
    if "json" in sample.members and image_ext is None:
        try:
            record = parse_json(sample.members["json"])  # the loader's parser: same bad_json
        except Reject:
            return DocView(sample.key, sample.shard, "unknown", rejected="bad_json")
        try:
            if record.get("is_gpt"):
                return _gpt_view(sample, record, config)
            if "text_list" in record:
                return _interleaved_view(sample, record, config)
        except (KeyError, TypeError, ValueError, AttributeError):
            return DocView(
                sample.key, sample.shard, "unknown", rejected="bad_record", record=record
            )
        return DocView(
            sample.key, sample.shard, "unknown", rejected="unknown_record_kind", record=record
        )
    if image_ext is not None:
        return _pair_view(sample, image_ext)
    return DocView(sample.key, sample.shard, "unknown", rejected="missing_json")


def _pair_view(sample: Sample, image_ext: str) -> DocView:
    raw, rejected = sample.members.get("txt"), None
    if raw is None:
        raw, rejected = b"", "missing_caption"
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        caption, rejected = raw.decode("utf-8", errors="replace").strip(), "bad_caption"
    image = ImageView(0, sample.members[image_ext], rejected is None, 0, reason=rejected)
    return DocView(sample.key, sample.shard, "pair", [caption], [image], rejected)


def _bytes(b64: str | None) -> bytes | None:
    try:
        return decode_base64(b64) if b64 else None
    except (binascii.Error, ValueError):
        return None


def _interleaved_view(sample: Sample, record: dict[str, Any], config: LoaderConfig) -> DocView:
    """The loader's checks in the loader's order: shape, plan, then sentences that are not text
    (its join fails). A wrong-shaped matrix or a number among the sentences is counted with the
    loader's reason, never a traceback."""
    if (problem := shape_problem(record)) is not None:
        return DocView(sample.key, sample.shard, "unknown", rejected=problem, record=record)
    plan = plan_interleaved(record, config)
    if not all(isinstance(text, str) for text in plan.sentences):
        reason = plan.rejected_reason or "bad_record"
        return DocView(sample.key, sample.shard, "unknown", rejected=reason, record=record)
    infos = record["image_info"]
    view = DocView(
        sample.key,
        sample.shard,
        "interleaved",
        list(plan.sentences),
        rejected=plan.rejected_reason,
        record=record,
    )
    for p in plan.placements:
        view.images.append(
            ImageView(
                p.image_index,
                _bytes(infos[p.image_index].get("image_base64")),
                True,
                p.sentence_index,
                p.similarity,
                name=infos[p.image_index].get("image_name", ""),
            )
        )
    taken = {p.sentence_index: p.image_index for p in plan.placements}
    taken.update(
        (d.sentence_index, d.image_index) for d in plan.dropped if d.sentence_index is not None
    )
    for d in plan.dropped:
        info = infos[d.image_index]
        sims = record["similarity_matrix"][d.image_index]
        where = _matched_sentence(info, len(plan.sentences))
        view.images.append(
            ImageView(
                d.image_index,
                _bytes(info.get("image_base64")),
                False,
                where,
                d.similarity if d.similarity is not None else (max(sims) if sims else None),
                d.reason,
                info.get("image_name", ""),
                _best_elsewhere(sims, d, taken),
            )
        )
    view.images.sort(key=lambda i: (i.where if i.where is not None else 0, not i.kept, i.index))
    if view.rejected is None and any(i.kept and i.data is None for i in view.images):
        view.rejected = "bad_base64"  # placed_image_bytes refuses the whole document
    return view


def _best_elsewhere(
    sims: list[float], dropped: Dropped, taken: dict[int, int]
) -> tuple[int, float, int | None] | None:
    """The image's best sentence when the assignment gave it another one: (sentence, similarity,
    the image that sentence went to)."""
    if dropped.sentence_index is None or not sims:
        return None
    best = max(range(len(sims)), key=lambda i: sims[i])
    if best == dropped.sentence_index:
        return None
    return best, float(sims[best]), taken.get(best)


def _matched_sentence(info: dict[str, Any], n_sentences: int) -> int:
    """Where a dropped image is shown: its source's matched sentence, which the loader never
    reads, so a null or text there is no reason to call the record bad (it did: bad_record)."""
    try:
        return min(max(int(info.get("matched_text_index", 0)), 0), n_sentences - 1)
    except (TypeError, ValueError, OverflowError):
        return 0


def _gpt_view(sample: Sample, record: dict[str, Any], config: LoaderConfig) -> DocView:
    plan = plan_gpt(record, config)
    pieces = PLACEHOLDER.split(record["example"])  # text, number, text, number, ...
    view = DocView(
        sample.key, sample.shard, "gpt", pieces[0::2], rejected=plan.rejected_reason, record=record
    )
    for position, number in enumerate(pieces[1::2]):
        name = f"_!_IMAGE{number}_!_"
        entry = record["image_map"].get(name) or {}
        # kept by position, not by name: a placeholder repeated past max_images showed as kept,
        # and every image of a rejected sequence was greyed as over_max_images
        kept = position < len(plan.image_names)
        reason = None if kept else plan.rejected_reason or "over_max_images"
        data = _bytes(entry.get("base64_image"))
        view.images.append(
            ImageView(int(number), data, kept, position + 1, reason=reason, name=name)
        )
    if view.rejected is None and any(i.kept and i.data is None for i in view.images):
        view.rejected = "bad_base64"  # gpt_image_bytes refuses the whole sequence
    return view
