"""Typed records, one per kind of sample, with to/from the JSON form of FORMATS.md.

Converters translate source items into these; everything after (images, checks, writing) is shared.
Unknown source fields are kept in ``extra`` so a round trip loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import pybase64

_IMAGE_INFO_FIELDS = (
    "image_name",
    "raw_url",
    "matched_text_index",
    "matched_sim",
    "face_detections",
)
_DOC_FIELDS = ("url", "text_list", "image_info", "similarity_matrix", "could_have_url_duplicate")
# Fields a source may lack: a record read from JSON writes them back only when the source had them,
# so no value (a matched_sim of 0.0, an empty url) appears that the source never held.
_OPTIONAL_INFO_FIELDS = ("raw_url", "matched_sim", "face_detections")
_OPTIONAL_DOC_FIELDS = ("url", "could_have_url_duplicate")


def _absent(obj: dict[str, Any], names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name for name in names if name not in obj)


def _without(out: dict[str, Any], absent: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k not in absent} if absent else out


def encode_base64(data: bytes) -> str:
    """Standard base64, ASCII, no data-url prefix (what open_flamingo decodes).

    pybase64 (SIMD): the standard library's codec was a quarter of a bytes-kept conversion.
    """
    return pybase64.b64encode(data).decode("ascii")


class RecordEncodingError(ValueError):
    """A record JSON cannot carry; ``args[0]`` is the reject reason, ``args[1]`` the detail."""


# The stats key (category ``values``) counting non-finite numbers written as null.
NON_FINITE_AS_NULL = "non_finite_as_null"


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """A shard member's bytes and how many values in it were written as null because JSON
    cannot hold them (NaN, ±Infinity, however the source spelled them): the writer counts them."""

    data: bytes
    non_finite_as_null: int = 0


def encode_record(record: dict[str, Any]) -> EncodedRecord:
    """Compact UTF-8 JSON for a shard member, with the count of its non-finite numbers.

    orjson: records are mostly base64 text, which the standard encoder escapes-scans slowly
    (about 10x slower); it writes NaN and ±Infinity as null, so they are counted here, where every
    converter passes. Text that UTF-8 cannot hold (a lone surrogate from a ``\\ud800`` escape)
    and integers beyond 64 bits are refused with a reason instead of being written.
    """
    try:
        data = orjson.dumps(record)
    except orjson.JSONEncodeError as exc:
        message = str(exc)
        reason = "invalid_unicode" if "UTF-8" in message else "unencodable_value"
        raise RecordEncodingError(reason, message) from exc
    non_finite = count_non_finite(record) if b"null" in data else 0
    return EncodedRecord(data, non_finite)


_CONTAINERS = (dict, list, tuple)


def count_non_finite(value: Any) -> int:
    """How many NaN/±Infinity floats ``value`` holds at any depth (dict values, list items);
    iterative, so nesting depth is no limit. ``x - x != 0`` holds exactly for NaN and ±inf."""
    if not isinstance(value, _CONTAINERS):
        return int(isinstance(value, float) and not math.isfinite(value))
    count, pending = 0, [value]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            node = node.values()
        elif node and isinstance(node[0], float) and _all_finite_numbers(node):
            continue
        for item in node:
            if isinstance(item, float):
                count += item - item != 0.0
            elif isinstance(item, _CONTAINERS):
                pending.append(item)
    return count


def _all_finite_numbers(items: list | tuple) -> bool:
    """True for a list of numbers only, all finite (a similarity-matrix row), summed in C: NaN
    or ±inf anywhere makes the sum non-finite. False is no verdict: the caller walks the items."""
    try:
        total = sum(items)
    except (TypeError, OverflowError):  # not only numbers; an int beyond a float's range
        return False
    return isinstance(total, int | float) and total - total == 0


def decode_base64(text: str) -> bytes:
    """Strict decode: raises ``binascii.Error`` on anything that is not clean base64 (~50x the
    standard library's speed, which matters to every loader worker)."""
    return pybase64.b64decode(text, validate=True)


@dataclass(slots=True)
class ImageInfo:
    """One image of an interleaved document; ``image_bytes`` is None when the image is missing."""

    image_name: str
    raw_url: str = ""
    matched_text_index: int = 0
    matched_sim: float = 0.0
    face_detections: Any = None
    image_bytes: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()  # fields the source lacked: not written

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image_name": self.image_name,
            "raw_url": self.raw_url,
            "matched_text_index": self.matched_text_index,
            "matched_sim": self.matched_sim,
            "face_detections": self.face_detections,
        }
        out = _without(out, self.absent)
        out.update(self.extra)
        if self.image_bytes is not None:
            out["image_base64"] = encode_base64(self.image_bytes)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageInfo:
        b64 = obj.get("image_base64")
        extra = {
            k: v for k, v in obj.items() if k not in _IMAGE_INFO_FIELDS and k != "image_base64"
        }
        return cls(
            image_name=obj.get("image_name", ""),
            raw_url=obj.get("raw_url", ""),
            matched_text_index=obj.get("matched_text_index", 0),
            matched_sim=obj.get("matched_sim", 0.0),
            face_detections=obj.get("face_detections"),
            image_bytes=decode_base64(b64) if b64 is not None else None,
            extra=extra,
            absent=_absent(obj, _OPTIONAL_INFO_FIELDS),
        )


@dataclass(slots=True)
class InterleavedDoc:
    """An MMC4-form document: sentences, images, and the images x sentences similarity matrix."""

    text_list: list[str]
    image_info: list[ImageInfo]
    similarity_matrix: list[list[float]]
    url: str = ""
    could_have_url_duplicate: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()  # fields the source lacked: not written

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "text_list": self.text_list,
            "image_info": [info.to_json() for info in self.image_info],
            "similarity_matrix": self.similarity_matrix,
            "could_have_url_duplicate": self.could_have_url_duplicate,
        }
        out = _without(out, self.absent)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> InterleavedDoc:
        return cls(
            url=obj.get("url", ""),
            text_list=list(obj["text_list"]),
            image_info=[ImageInfo.from_json(i) for i in obj["image_info"]],
            similarity_matrix=obj["similarity_matrix"],
            could_have_url_duplicate=obj.get("could_have_url_duplicate", 0),
            extra={k: v for k, v in obj.items() if k not in _DOC_FIELDS},
            absent=_absent(obj, _OPTIONAL_DOC_FIELDS),
        )


@dataclass(slots=True)
class GptImage:
    """One ``image_map`` entry of a GPT sequence; ``image_bytes`` becomes ``base64_image``."""

    url: str = ""
    image_bytes: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.url:
            out.setdefault("url", self.url)
        if self.image_bytes is not None:
            out["base64_image"] = encode_base64(self.image_bytes)
        return out


@dataclass(slots=True)
class GptSequence:
    """A ChatGPT-generated interleaved sequence: ``example`` text with ``_!_IMAGEk_!_`` placeholders."""

    example: str
    image_map: dict[str, GptImage]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["is_gpt"] = True
        out["example"] = self.example
        out["image_map"] = {name: img.to_json() for name, img in self.image_map.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GptSequence:
        image_map = {}
        for name, entry in obj["image_map"].items():
            b64 = entry.get("base64_image")
            image_map[name] = GptImage(
                url=entry.get("url", ""),
                image_bytes=decode_base64(b64) if b64 is not None else None,
                extra={k: v for k, v in entry.items() if k not in ("base64_image", "url")},
            )
        extra = {k: v for k, v in obj.items() if k not in ("is_gpt", "example", "image_map")}
        return cls(example=obj["example"], image_map=image_map, extra=extra)


@dataclass(slots=True)
class Pair:
    """An image-text pair (LAION form): stored as img2dataset's ``.jpg``/``.txt``/``.json`` members."""

    caption: str
    image_bytes: bytes
    image_ext: str = "jpg"
    meta: dict[str, Any] = field(default_factory=dict)
