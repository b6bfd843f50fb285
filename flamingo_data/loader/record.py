"""A shard's JSON member as the record the loader, inspect and preview plan from; needs no torch."""

from __future__ import annotations

from typing import Any

import orjson

from flamingo_data.loader.interleaved import Reject


def parse_json(raw: bytes) -> dict[str, Any]:
    """orjson, which validate's ``parse_record`` runs first, so a record it passes parses here
    (inspect and preview parse with this too, so they count what the loader counts).
    json.loads let NaN/Infinity, 1e400 and lone surrogates through to crash the image matching or
    the tokenizer, and raised uncaught errors on deep nesting and 5000-digit integers; orjson
    refuses all of them (nesting over 1024) and is ~4x faster on base64-heavy records."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Reject("bad_json") from exc
    if not isinstance(record, dict):
        raise Reject("bad_json")
    return record
