"""One OBELICS-style document: its checks and its interleaved (MMC4-form) record.

A document holds parallel ``images`` and ``texts`` lists in which each position holds exactly one
of an image url or a text, plus ``metadata`` (one entry per position) and ``general_metadata``
(the page's), each a JSON string (OBELICS's parquet) or the decoded value (JSON lines). Each text
becomes one sentence; each image is matched to the sentence that follows it, and an image followed
by another image or by the document's end owns the sentence ``IMAGE_ONLY_SENTENCE``, so that every
image has a sentence of its own and a one-to-one assignment keeps them all where they were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flamingo_data.core.records import ImageInfo, InterleavedDoc

IMAGE_ONLY_SENTENCE = (
    "\n"  # as converters/conversations.py writes for an image with no text after it
)
METADATA_FIELDS = ("metadata", "general_metadata")


class DocumentError(ValueError):
    """A source document that cannot become a record; ``args[0]`` is the reason, ``args[1:]`` a detail."""


@dataclass(frozen=True, slots=True)
class SourceImage:
    """An image of the document: its position in the lists, its url and its metadata entry."""

    position: int
    url: str
    metadata: Any = None


@dataclass(frozen=True, slots=True)
class Document:
    """A checked document: ``parts`` in order, each a text (str) or an image (SourceImage)."""

    parts: list[str | SourceImage]
    text_metadata: list[Any]  # one per text part: its metadata entry (None for most)
    general_metadata: dict[str, Any] | None

    @property
    def images(self) -> list[SourceImage]:
        return [part for part in self.parts if isinstance(part, SourceImage)]


def parse_line(line: bytes) -> Any:
    """The JSON value of one line; DocumentError("bad_json") when it is none."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:  # also a >4300-digit integer, deep nesting
        raise DocumentError("bad_json") from exc


def check_document(item: Any) -> Document:
    """The document's parts in order, or DocumentError naming what is wrong with its shape."""
    if not isinstance(item, dict):
        raise DocumentError("not_an_object")
    images, texts = item.get("images"), item.get("texts")
    if not _list_of_optional_strings(images) or not _list_of_optional_strings(texts):
        raise DocumentError("bad_fields", "images and texts must be lists of strings or nulls")
    if len(images) != len(texts):
        raise DocumentError("length_mismatch", f"{len(images)} images, {len(texts)} texts")
    metadata = _position_metadata(item.get("metadata"), len(images))
    general = _general_metadata(item.get("general_metadata"))
    parts: list[str | SourceImage] = []
    text_metadata = []
    for position, (url, text) in enumerate(zip(images, texts, strict=True)):
        if url is not None and text is not None:
            raise DocumentError("position_both", f"position {position}")
        if url is None and text is None:
            raise DocumentError("position_empty", f"position {position}")
        if url is not None:
            parts.append(SourceImage(position, url, metadata[position]))
        else:
            parts.append(text)
            text_metadata.append(metadata[position])
    if not text_metadata or not any(p.strip() for p in parts if isinstance(p, str)):
        raise DocumentError("no_text")
    return Document(parts, text_metadata, general)


def _list_of_optional_strings(value: Any) -> bool:
    return isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)


def _decoded(value: Any, name: str) -> Any:
    """A metadata field's value: a JSON string (or UTF-8 bytes of one) decoded, anything else as is."""
    if isinstance(value, bytes | str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise DocumentError("bad_metadata", f"{name} is not JSON") from exc
    return value


def _position_metadata(value: Any, positions: int) -> list[Any]:
    """One entry (an object or null) per position; absent or null metadata gives nulls."""
    decoded = _decoded(value, "metadata")
    if decoded is None:
        return [None] * positions
    if not isinstance(decoded, list) or len(decoded) != positions:
        raise DocumentError("bad_metadata", f"metadata is not a list of {positions} entries")
    if not all(entry is None or isinstance(entry, dict) for entry in decoded):
        raise DocumentError("bad_metadata", "a metadata entry is neither an object nor null")
    return decoded


def _general_metadata(value: Any) -> dict[str, Any] | None:
    decoded = _decoded(value, "general_metadata")
    if decoded is not None and not isinstance(decoded, dict):
        raise DocumentError("bad_metadata", "general_metadata is not an object")
    return decoded


def image_name(image: SourceImage) -> str:
    """A plain file name, stable for the document: the image's position in the source lists."""
    return f"image-{image.position:05d}"


def interleaved_record(doc: Document, kept: dict[int, bytes]) -> dict[str, Any]:
    """The record of ``doc`` with the images whose position is in ``kept`` (position -> bytes);
    the others are left out, and so is the sentence they alone would have owned."""
    parts = [p for p in doc.parts if not isinstance(p, SourceImage) or p.position in kept]
    sentences: list[str] = []
    text_metadata: list[Any] = []
    matched: list[tuple[SourceImage, int]] = []
    texts = iter(doc.text_metadata)
    for index, part in enumerate(parts):
        if isinstance(part, str):
            sentences.append(part)
            text_metadata.append(next(texts))
            continue
        matched.append((part, len(sentences)))
        following = parts[index + 1] if index + 1 < len(parts) else None
        if not isinstance(following, str):
            sentences.append(IMAGE_ONLY_SENTENCE)
            text_metadata.append(None)
    infos = [
        ImageInfo(
            image_name=image_name(image),
            raw_url=image.url,
            matched_text_index=sentence,
            matched_sim=1.0,
            image_bytes=kept[image.position],
            extra={} if image.metadata is None else {"metadata": image.metadata},
            absent=frozenset({"face_detections"}),
        )
        for image, sentence in matched
    ]
    matrix = [[1.0 if j == s else 0.0 for j in range(len(sentences))] for _, s in matched]
    return InterleavedDoc(
        text_list=sentences,
        image_info=infos,
        similarity_matrix=matrix,
        url=_page_url(doc.general_metadata),
        extra=_document_extra(doc.general_metadata, text_metadata),
        absent=frozenset({"could_have_url_duplicate"} | _no_url(doc.general_metadata)),
    ).to_json()


def _page_url(general: dict[str, Any] | None) -> str:
    url = (general or {}).get("url")
    return url if isinstance(url, str) else ""


def _no_url(general: dict[str, Any] | None) -> set[str]:
    return set() if isinstance((general or {}).get("url"), str) else {"url"}


def _document_extra(general: dict[str, Any] | None, text_metadata: list[Any]) -> dict[str, Any]:
    """``general_metadata`` as an object, and ``text_metadata`` (one entry per sentence) when a
    text's metadata entry is not null."""
    extra: dict[str, Any] = {}
    if general is not None:
        extra["general_metadata"] = general
    if any(entry is not None for entry in text_metadata):
        extra["text_metadata"] = text_metadata
    return extra
