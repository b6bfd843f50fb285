"""Interleaved (MMC4-form) documents -> one training sample.

``plan_interleaved`` decides, without decoding any image, which images the loader keeps and at which
sentence; preview and inspect render exactly this plan. Images are bound in TEXT order: the k-th
``<image>`` token is the k-th image tensor (open_flamingo orders tensors by image index instead).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from flamingo_data.core.records import decode_base64
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.tokenizer import EOC_TOKEN, IMAGE_TOKEN


class Reject(Exception):
    """A sample the loader will not train on; ``args[0]`` is the counted reason."""


@dataclass(frozen=True, slots=True)
class Placement:
    image_index: int
    sentence_index: int
    similarity: float


@dataclass(frozen=True, slots=True)
class Dropped:
    """An image the loader leaves out; ``sentence_index``/``similarity``: the sentence the
    one-to-one assignment gave it and their similarity, when it got one."""

    image_index: int
    reason: str
    sentence_index: int | None = None
    similarity: float | None = None


@dataclass
class InterleavedPlan:
    sentences: list[str]
    placements: list[Placement] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    rejected_reason: str | None = None


def approx_b64_bytes(text: str) -> int:
    """Decoded size of a base64 string without decoding it (the cheap check comes first)."""
    return len(text) * 3 // 4 - text[-2:].count("=")


def shape_problem(record: dict[str, Any]) -> str | None:
    """Why the loader refuses a record before planning it (``bad_record``: a field missing or not
    a list; ``bad_matrix_shape``: not images x sentences, or no sentence), or None. Shared by the
    loader and by inspect/preview, so all three count the same records the same way."""
    try:
        n_images, n_sentences = len(record["image_info"]), len(record["text_list"])
        matrix = record["similarity_matrix"]
        ok = len(matrix) == n_images and all(len(row) == n_sentences for row in matrix)
    except (KeyError, TypeError):
        return "bad_record"
    return None if ok and n_sentences else "bad_matrix_shape"


def plan_interleaved(
    record: dict[str, Any], config: LoaderConfig, exclude: frozenset[int] = frozenset()
) -> InterleavedPlan:
    """Which images go before which sentences: max-similarity one-to-one matching, threshold, max images."""
    plan = InterleavedPlan(sentences=list(record["text_list"]))
    usable = []
    for i, info in enumerate(record["image_info"]):
        reason = _unusable(info, config) if i not in exclude else "undecodable_image"
        if reason:
            plan.dropped.append(Dropped(i, reason))
        else:
            usable.append(i)
    if usable:
        _assign(record, usable, config, plan)
    if not plan.placements:
        plan.rejected_reason = "no_images"
    plan.dropped.sort(key=lambda d: d.image_index)
    return plan


def _unusable(info: dict[str, Any], config: LoaderConfig) -> str | None:
    b64 = info.get("image_base64")
    if not b64:
        return "no_image_bytes"
    if approx_b64_bytes(b64) < config.min_image_bytes:
        return "too_small"
    return None


def _assign(
    record: dict[str, Any], usable: list[int], config: LoaderConfig, plan: InterleavedPlan
) -> None:
    sim = np.asarray(record["similarity_matrix"], dtype=np.float64)[usable]
    rows, cols = linear_sum_assignment(-sim)
    matched = set()
    candidates = []
    for r, c in zip(rows, cols, strict=True):
        matched.add(usable[r])
        if sim[r, c] >= config.sim_threshold:
            candidates.append(Placement(usable[r], int(c), float(sim[r, c])))
        else:
            plan.dropped.append(Dropped(usable[r], "below_threshold", int(c), float(sim[r, c])))
    plan.dropped.extend(Dropped(i, "not_matched") for i in usable if i not in matched)
    candidates.sort(key=lambda p: p.sentence_index)
    plan.placements = candidates[: config.max_images]
    plan.dropped.extend(
        Dropped(p.image_index, "over_max_images", p.sentence_index, p.similarity)
        for p in candidates[config.max_images :]
    )


def interleaved_text(plan: InterleavedPlan, eos_token: str) -> str:
    """open_flamingo's text form: ``<|endofchunk|><image>`` before each placed sentence, first eoc removed."""
    sentences = list(plan.sentences)
    for placement in plan.placements:
        sentences[placement.sentence_index] = (
            f"{EOC_TOKEN}{IMAGE_TOKEN}{sentences[placement.sentence_index]}"
        )
    text = " ".join(sentences).replace(EOC_TOKEN, "", 1)
    text = text.replace(f" {EOC_TOKEN}", EOC_TOKEN).replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN)
    text = text.replace(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    return f"{text}{EOC_TOKEN}{eos_token}"


def placed_image_bytes(record: dict[str, Any], plan: InterleavedPlan) -> list[tuple[int, bytes]]:
    """(image index, bytes) in text order; raises Reject on bad base64."""
    out = []
    for placement in plan.placements:
        try:
            out.append(
                (
                    placement.image_index,
                    decode_base64(record["image_info"][placement.image_index]["image_base64"]),
                )
            )
        except (binascii.Error, ValueError) as exc:
            raise Reject("bad_base64") from exc
    return out
