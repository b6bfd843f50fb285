"""One raw tar sample -> one training sample (tensors), or a Reject with a counted reason.

A plain function of (sample, options, rng): testable without workers, reproducible, and the rng is
seeded from (seed, epoch, key) so random choices do not depend on worker count or order.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.gpt import gpt_image_bytes, plan_gpt
from flamingo_data.loader.imageproc import image_pixels
from flamingo_data.loader.interleaved import (
    Reject,
    interleaved_text,
    placed_image_bytes,
    plan_interleaved,
    shape_problem,
)
from flamingo_data.loader.labels import IGNORE, make_labels
from flamingo_data.loader.record import parse_json
from flamingo_data.loader.roles import (
    OwnedText,
    example_spans,
    gpt_owned_text,
    interleaved_owned_text,
    is_span,
    sentence_roles,
    shift_spans,
    trained_tokens,
)
from flamingo_data.loader.tokenizer import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    as_text,
    literal_specials,
    special_ids,
)
from flamingo_data.storage.shard_reader import DECODED_EXTS, IMAGE_EXTS, Sample


@dataclass
class TextContext:
    """The tokenizer, its special ids and the pattern of their strings, looked up once per worker."""

    tokenizer: Any
    ids: dict[str, int]
    specials: re.Pattern

    @classmethod
    def of(cls, tokenizer) -> TextContext:
        return cls(tokenizer, special_ids(tokenizer), literal_specials(tokenizer))


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


def preprocess(
    sample: Sample,
    dataset: str,
    text: TextContext,
    config: LoaderConfig,
    rng: np.random.Generator,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Dispatch on the record kind; raises Reject(reason). ``special_token_text`` counts the
    literal special-token strings in the source text, broken so they stay text (``as_text``)."""
    if "json" in sample.members and not any(ext in sample.members for ext in IMAGE_EXTS):
        record, changed = _record_as_text(parse_json(sample.members["json"]), text)
        out = _from_record(record, text, config, rng)
        out["special_token_text"] = changed
    elif any(ext in sample.members for ext in IMAGE_EXTS):
        out = _pair(sample, text, config, rng)
    else:
        raise Reject("unexpected_member" if set(sample.members) - DECODED_EXTS else "missing_json")
    out.update(key=sample.key, dataset=dataset)
    return out


def _from_record(
    record: dict[str, Any], text: TextContext, config: LoaderConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """A field of the wrong type (a number in text_list, a string in similarity_matrix, an image
    entry that is not an object) is a counted bad_record: unvalidated data must not stop a run."""
    try:
        if record.get("is_gpt"):
            return _gpt(record, text, config, rng)
        if "text_list" in record:
            return _interleaved(record, text, config, rng)
    except (TypeError, ValueError, AttributeError) as exc:
        raise Reject("bad_record") from exc
    raise Reject("unknown_record_kind")


def _record_as_text(record: dict[str, Any], text: TextContext) -> tuple[dict[str, Any], int]:
    """The record with its source text (sentences, GPT example) through ``as_text``. One search
    over the joined sentences first: almost every document has no literal special token."""
    example, sentences = record.get("example"), record.get("text_list")
    if record.get("is_gpt") and isinstance(example, str):
        broken, changed = as_text(example, text.specials)
        if not changed:
            return record, 0
        spans = record.get("role_spans")
        if isinstance(spans, list) and all(is_span(span) for span in spans):
            inserted = [found.start() + 1 for found in text.specials.finditer(example)]
            spans = [list(span) for span in shift_spans(spans, inserted)]
            return {**record, "example": broken, "role_spans": spans}, changed
        return {**record, "example": broken}, changed
    if not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
        return record, 0  # not a list of strings: bad_record
    if not text.specials.search("\n".join(sentences)):
        return record, 0
    pairs = [as_text(sentence, text.specials) for sentence in sentences]
    return {**record, "text_list": [s for s, _ in pairs]}, sum(n for _, n in pairs)


def _tokenize(text: TextContext, string: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = text.tokenizer(
        string, max_length=max_tokens, truncation=True, padding="max_length", return_tensors="pt"
    )
    return enc["input_ids"][0], enc["attention_mask"][0]


def _tokenize_owned(
    text: TextContext, owned: OwnedText, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_tokenize`` of ``owned.text``, and which of its tokens hold assistant text."""
    enc = text.tokenizer(
        owned.text,
        max_length=max_tokens,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
        return_offsets_mapping=True,
    )
    return (
        enc["input_ids"][0],
        enc["attention_mask"][0],
        trained_tokens(enc["offset_mapping"][0], owned),
    )


def _finish(
    ids: torch.Tensor,
    mask: torch.Tensor,
    images: list[torch.Tensor],
    text: TextContext,
    config: LoaderConfig,
    rng: np.random.Generator,
    pad_images: int,
    trained: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The sample's tensors; ``trained`` [T] (when the record names its turns' roles): the tokens
    that keep their labels, on top of ``make_labels``."""
    if len(images) < config.min_images:
        raise Reject("too_few_images_after_truncation")
    if (
        len(images) == 1
        and config.single_image_keep_prob < 1.0
        and rng.random() >= config.single_image_keep_prob
    ):
        raise Reject("single_image_subsampled")
    labels = make_labels(ids, text.ids["image"], text.ids["eoc"], text.ids["pad"])
    if trained is not None:
        labels = labels.masked_fill(~trained, IGNORE)
    if not bool((labels != IGNORE).any()):
        raise Reject("no_trainable_tokens")
    return {
        "pixels": torch.stack(images),  # uint8 [n, 3, S, S]; normalized per batch (vision_batch)
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pad_images": pad_images,
    }


def _decode_all(
    blobs: list[bytes], config: LoaderConfig, flip: bool
) -> tuple[list[torch.Tensor], int | None]:
    """Tensors for each blob, or the position of the first one that does not decode."""
    tensors = []
    for position, data in enumerate(blobs):
        try:
            tensors.append(image_pixels(data, config, flip))
        except Exception:  # undecodable or over the pixel cap: the caller drops this image
            return tensors, position
    return tensors, None


def _interleaved(
    record: dict[str, Any], text: TextContext, config: LoaderConfig, rng: np.random.Generator
):
    _check_interleaved_shape(record)
    roles = sentence_roles(record, config.loss_on)
    flip = rng.random() < config.flip_prob
    excluded: set[int] = set()
    while True:
        plan = plan_interleaved(record, config, frozenset(excluded))
        if plan.rejected_reason:
            raise Reject(
                "undecodable_image"
                if excluded and plan.rejected_reason == "no_images"
                else plan.rejected_reason
            )
        eos = text.tokenizer.eos_token
        trained = None
        if roles is None:
            ids, mask = _tokenize(text, interleaved_text(plan, eos), config.max_tokens)
        else:
            owned = interleaved_owned_text(plan, roles, eos)
            ids, mask, trained = _tokenize_owned(text, owned, config.max_tokens)
        n_tokens = int((ids == text.ids["image"]).sum())
        placed = placed_image_bytes(record, plan)[:n_tokens]
        tensors, bad = _decode_all([data for _, data in placed], config, flip)
        if bad is None:
            return _finish(ids, mask, tensors, text, config, rng, config.max_images, trained)
        excluded.add(placed[bad][0])


def _check_interleaved_shape(record: dict[str, Any]) -> None:
    if (problem := shape_problem(record)) is not None:
        raise Reject(problem)


def _gpt(record: dict[str, Any], text: TextContext, config: LoaderConfig, rng: np.random.Generator):
    try:
        plan = plan_gpt(record, config)
    except (KeyError, TypeError, AttributeError) as exc:
        raise Reject("bad_record") from exc
    if plan.rejected_reason:
        raise Reject(plan.rejected_reason)
    eos, trained = text.tokenizer.eos_token, None
    spans = example_spans(record, config.loss_on)
    if spans is None:
        ids, mask = _tokenize(text, f"{plan.text}{EOC_TOKEN}{eos}", config.max_tokens)
    else:
        owned = gpt_owned_text(record["example"], spans, config.max_images, eos)
        ids, mask, trained = _tokenize_owned(text, owned, config.max_tokens)
    n_tokens = int((ids == text.ids["image"]).sum())
    tensors, bad = _decode_all(
        gpt_image_bytes(record, plan)[:n_tokens], config, rng.random() < config.flip_prob
    )
    if bad is not None:
        raise Reject("undecodable_image")
    return _finish(ids, mask, tensors, text, config, rng, config.max_images, trained)


def _pair(sample: Sample, text: TextContext, config: LoaderConfig, rng: np.random.Generator):
    image_ext = next(ext for ext in IMAGE_EXTS if ext in sample.members)
    try:
        caption = sample.members["txt"].decode("utf-8").strip()
    except KeyError as exc:
        raise Reject("missing_caption") from exc
    except UnicodeDecodeError as exc:
        raise Reject("bad_caption") from exc
    caption, changed = as_text(caption, text.specials)
    string = f"{IMAGE_TOKEN}{caption}{EOC_TOKEN}{text.tokenizer.eos_token}"
    ids, mask = _tokenize(text, string, config.pair_max_tokens)
    tensors, bad = _decode_all([sample.members[image_ext]], config, rng.random() < config.flip_prob)
    if bad is not None:
        raise Reject("undecodable_image")
    return {**_finish(ids, mask, tensors, text, config, rng, 1), "special_token_text": changed}
