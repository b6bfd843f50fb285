"""ChatGPT-generated sequences -> one training sample: placeholders become ``<|endofchunk|><image>``.

Images are bound by the placeholder numbers in text order. open_flamingo cuts the text at the
``max_images``-th image, which keeps only ``max_images - 1`` images; here exactly ``max_images`` are kept.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from flamingo_data.core.records import decode_base64
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.interleaved import Reject
from flamingo_data.loader.tokenizer import EOC_TOKEN, IMAGE_TOKEN

PLACEHOLDER = re.compile(r"_!_IMAGE(\d+)_!_")


@dataclass
class GptPlan:
    text: str
    image_names: list[str] = field(default_factory=list)  # in text order, at most max_images
    dropped: list[tuple[str, str]] = field(default_factory=list)
    rejected_reason: str | None = None


def plan_gpt(record: dict[str, Any], config: LoaderConfig) -> GptPlan:
    """Text with ``<image>`` markers and the image_map entries bound to them, in text order."""
    example, image_map = record["example"], record["image_map"]
    names = [m.group(0) for m in PLACEHOLDER.finditer(example)]
    missing = [n for n in names if not (image_map.get(n) or {}).get("base64_image")]
    if missing:
        return GptPlan(example, rejected_reason="placeholder_without_image")
    kept, dropped = (
        names[: config.max_images],
        [(n, "over_max_images") for n in names[config.max_images :]],
    )
    text = example
    if len(names) > config.max_images:
        text = text[: list(PLACEHOLDER.finditer(example))[config.max_images].start()]
    text = PLACEHOLDER.sub(EOC_TOKEN + IMAGE_TOKEN, text).replace(EOC_TOKEN, "", 1)
    text = text.replace(f" {EOC_TOKEN}", EOC_TOKEN).replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN)
    text = text.replace(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    plan = GptPlan(text, kept, dropped)
    if not kept:
        plan.rejected_reason = "no_images"
    return plan


def gpt_image_bytes(record: dict[str, Any], plan: GptPlan) -> list[bytes]:
    try:
        return [
            decode_base64(record["image_map"][name]["base64_image"]) for name in plan.image_names
        ]
    except (binascii.Error, ValueError) as exc:
        raise Reject("bad_base64") from exc
