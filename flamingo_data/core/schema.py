"""Load the JSON Schemas shipped in ``flamingo_data.schemas``; one validator per kind, cached."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from flamingo_data.core.fast_schema import CERTAINLY_VALID

KINDS = ("interleaved", "gpt", "pair", "sizes", "stats")


@cache
def load_schema(kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise KeyError(f"no schema {kind!r}; known: {', '.join(KINDS)}")
    text = resources.files("flamingo_data.schemas").joinpath(f"{kind}.schema.json").read_text()
    return json.loads(text)


@cache
def validator(kind: str) -> Draft202012Validator:
    schema = load_schema(kind)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(kind: str, obj: Any, limit: int = 3) -> list[str]:
    """Human-readable schema violations (path: message), at most ``limit``; a record a typed
    check proves valid (``fast_schema``) skips jsonschema."""
    proven = CERTAINLY_VALID.get(kind)
    if proven is not None and proven(obj):
        return []
    errors = sorted(validator(kind).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
        for e in errors[:limit]
    ]


def record_kind(obj: Any) -> str:
    """Which record kind a shard's JSON member is: gpt, interleaved, or pair metadata. Any true
    ``is_gpt`` means gpt, as for the loader (the gpt schema then refuses ``"is_gpt": 1``)."""
    if isinstance(obj, dict) and obj.get("is_gpt"):
        return "gpt"
    if isinstance(obj, dict) and "text_list" in obj:
        return "interleaved"
    return "pair"
