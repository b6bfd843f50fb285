"""The typed schema checks are never lax: whatever they prove valid, jsonschema finds valid."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flamingo_data.core.fast_schema import interleaved_certainly_valid
from flamingo_data.core.schema import schema_errors, validator
from flamingo_data.demo.sample_data import make_document

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = (
    "text_list",
    "image_info",
    "similarity_matrix",
    "url",
    "could_have_url_duplicate",
    "is_gpt",
)
INFO_FIELDS = ("image_name", "matched_text_index", "raw_url", "matched_sim", "image_base64")


def valid_record(seed: int) -> dict[str, Any]:
    record = make_document(np.random.default_rng(seed), f"d{seed}", 4, 3)
    for info in record["image_info"]:
        info["image_base64"] = "/9j/4AAQ"
    return record


def mutate(record: dict, data: st.DataObject) -> dict:
    """One change anywhere a check looks: a field replaced, dropped or added, at the top, in an
    image entry, a sentence or a matrix cell."""
    record = copy.deepcopy(record)
    where = data.draw(st.sampled_from(["top", "info", "text", "cell"]))
    value = data.draw(JSON_VALUES)
    if where == "top":
        field = data.draw(st.sampled_from(FIELDS))
        if data.draw(st.booleans()):
            record.pop(field, None)
        else:
            record[field] = value
    elif where == "info":
        info = record["image_info"][data.draw(st.integers(0, 2))]
        field = data.draw(st.sampled_from(INFO_FIELDS))
        if data.draw(st.booleans()):
            info.pop(field, None)
        else:
            info[field] = value
    elif where == "text":
        record["text_list"][data.draw(st.integers(0, 3))] = value
    else:
        record["similarity_matrix"][data.draw(st.integers(0, 2))][data.draw(st.integers(0, 3))] = (
            value
        )
    return record


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 50), data=st.data())
def test_a_record_proven_valid_is_valid_for_jsonschema(seed: int, data: st.DataObject) -> None:
    record = mutate(valid_record(seed), data)
    if interleaved_certainly_valid(record):
        assert validator("interleaved").is_valid(record), record


def test_converter_records_take_the_fast_path_and_bad_ones_get_jsonschema_words() -> None:
    record = valid_record(0)
    assert interleaved_certainly_valid(record) and schema_errors("interleaved", record) == []
    for field, value in (("text_list", []), ("could_have_url_duplicate", True)):
        bad = {**record, field: value}
        assert not interleaved_certainly_valid(bad)
        assert schema_errors("interleaved", bad)
    flagged = {**record, "is_gpt": False}
    assert not interleaved_certainly_valid(flagged)
    assert schema_errors("interleaved", flagged)
