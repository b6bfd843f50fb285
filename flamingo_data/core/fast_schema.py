"""Typed checks that prove a record meets its JSON Schema without running jsonschema.

jsonschema walks every value of a record (each number of the similarity matrix) through its
generic machinery: 44% of ``validate``'s time on web-like shards. A check here answers True only
when the record certainly meets the schema; False means "not proven", and jsonschema then
decides and words the errors, so a check may be strict but never lax
(tests/core/test_fast_schema.py holds it to that on mutated records).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_NUMBER = (int, float)


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER  # a bool is no JSON Schema number


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _optional(record: dict, name: str, check: Callable[[Any], bool]) -> bool:
    return name not in record or check(record[name])


def _image_info_ok(info: Any) -> bool:
    return (
        type(info) is dict
        and type(info.get("image_name")) is str
        and _is_count(info.get("matched_text_index"))
        and _optional(info, "raw_url", lambda v: type(v) is str)
        and _optional(info, "matched_sim", _is_number)
        and _optional(info, "image_base64", lambda v: type(v) is str and len(v) >= 4)
    )


def _matrix_ok(matrix: Any) -> bool:
    return type(matrix) is list and all(
        type(row) is list and all(type(v) in _NUMBER for v in row) for row in matrix
    )


def interleaved_certainly_valid(record: Any) -> bool:
    """True when ``record`` meets schemas/interleaved.schema.json."""
    if type(record) is not dict or "is_gpt" in record:
        return False
    text, infos = record.get("text_list"), record.get("image_info")
    return (
        type(text) is list
        and len(text) > 0
        and all(type(t) is str for t in text)
        and type(infos) is list
        and all(_image_info_ok(info) for info in infos)
        and _matrix_ok(record.get("similarity_matrix"))
        and _optional(record, "url", lambda v: type(v) is str)
        and _optional(record, "could_have_url_duplicate", lambda v: type(v) is int and v in (0, 1))
    )


CERTAINLY_VALID: dict[str, Callable[[Any], bool]] = {"interleaved": interleaved_certainly_valid}
