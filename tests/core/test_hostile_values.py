"""Values are kept or counted, never changed silently.

Every converter is run on generated inputs holding numbers JSON cannot carry (NaN, ±Infinity and
number literals beyond a double's range, whatever their spelling) at many positions: each such
value must be written as null AND counted once in ``values.non_finite_as_null``, every other value
must come back exactly as it went in, and keys must be exactly the expected ones. ``validate`` must
report numbers that JSON readers disagree on, and whole-value checks (ids, sizes.json names) must
not accept a trailing newline.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.storage.shard_writer import ShardWriter
from tests.loader_data import interleaved_record, solid_jpeg
from tests.test_upstream_compat import write_img2dataset_output

# JSON texts that Python reads as a non-finite float: each must become null, counted once.
NON_FINITE = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e999",
    "1E+999",
    "0.1e99999",
    "-1" + "0" * 400 + ".5",
]
# JSON numbers a double or a 64-bit integer holds: each must come back exactly, uncounted.
FINITE = [
    "1e308",
    "-0.0",
    "5e-324",
    "0.30000000000000004",
    "18446744073709551615",
    "-9223372036854775808",
]
MARK = "@VALUE@"


def spelled(obj: Any, spelling: str) -> str:
    """``obj`` as JSON text with every ``MARK`` string replaced by the literal ``spelling``."""
    return json.dumps(obj).replace(json.dumps(MARK), spelling)


def expected(obj: Any, spelling: str) -> Any:
    """``obj`` with every ``MARK`` as the value a reader must see: null when non-finite."""
    value = json.loads(spelling)
    value = None if isinstance(value, float) and not math.isfinite(value) else value
    if obj == MARK:
        return value
    if isinstance(obj, dict):
        return {k: expected(v, spelling) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expected(v, spelling) for v in obj]
    return obj


def marks(obj: Any) -> int:
    return json.dumps(obj).count(json.dumps(MARK))


def same(a: Any, b: Any) -> bool:
    """Equal with types and the sign of zero: ``0 == 0.0 == -0.0`` would hide a changed value."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    return repr(a) == repr(b)


def tar_records(out: Path) -> dict[str, dict]:
    """Every member of every tar, by member name, parsed as JSON (strictly: no NaN allowed)."""
    records: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                raw = tar.extractfile(member).read()
                records[member.name] = json.loads(raw, parse_constant=_no_constant)
    return records


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} written into a shard")


def stats_of(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def assert_balanced(stats: dict) -> None:
    counts = stats["counts"]["documents"]
    assert counts["in"] == counts.get("written", 0) + counts.get("rejected", 0)


# ---------------------------------------------------------------- MMC4


def _mmc4_positions(good: dict) -> Iterator[tuple[str, dict]]:
    """(name, document with ``MARK`` somewhere outside the similarity matrix)."""

    def variant(change: Callable[[dict], None]) -> dict:
        doc = copy.deepcopy(good)
        change(doc)
        return doc

    yield "doc_field", variant(lambda d: d.update(score=MARK))
    yield "nested_object", variant(lambda d: d.update(meta={"a": {"b": MARK, "c": "x"}}))
    yield "list_item", variant(lambda d: d.update(scores=[1, MARK, 2.5]))
    yield "image_info_field", variant(lambda d: d["image_info"][0].update(aesthetic=MARK))
    yield (
        "face_detections_list",
        variant(lambda d: d["image_info"][0].update(face_detections=[[0.1, MARK, 0.3]])),
    )
    yield (
        "face_detections_dict",
        variant(
            lambda d: d["image_info"][-1].update(
                face_detections=[{"confidence": MARK, "box": [1, 2]}]
            )
        ),
    )
    yield "three_values", variant(lambda d: d.update(a=MARK, b=[MARK, {"c": MARK}]))
    yield "matrix", variant(lambda d: d["similarity_matrix"][0].__setitem__(0, MARK))
    yield "matched_sim", variant(lambda d: d["image_info"][0].update(matched_sim=MARK))


@pytest.fixture
def mmc4_sample(tmp_path: Path) -> dict:
    return write_mmc4_sample(
        tmp_path / "src", n_shards=1, docs_per_shard=1, missing_rate=0.0, seed=3
    )


def _write_mmc4_lines(sample: dict, lines: list[str]) -> None:
    docs_zip = Path(sample["docs"]).parent / "shard_0.zip"
    with zipfile.ZipFile(docs_zip, "w") as zf:
        zf.writestr("shard_0.jsonl", "\n".join(lines) + "\n")


def _convert_mmc4(sample: dict, out: Path) -> dict:
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    return stats_of(out)


def _without_images(record: dict) -> dict:
    for info in record["image_info"]:
        assert base64.b64decode(info.pop("image_base64"))  # every image of the sample exists
    return record


# where a non-finite value rejects the document (reason) instead of becoming null
CHECKED = {"matrix": "bad_matrix_shape", "matched_sim": "schema"}


@pytest.mark.parametrize("spelling", NON_FINITE + FINITE)
def test_mmc4_values_are_kept_or_written_as_null_and_counted_once(
    mmc4_sample: dict, tmp_path: Path, spelling: str
) -> None:
    good = mmc4_sample["documents"][0][0]
    positions = list(_mmc4_positions(good))
    _write_mmc4_lines(mmc4_sample, [spelled(doc, spelling) for _, doc in positions])
    stats = _convert_mmc4(mmc4_sample, tmp_path / "out")
    records = tar_records(tmp_path / "out")
    rejected = {name for name, _ in positions if name in CHECKED and spelling in NON_FINITE}
    kept = [
        (f"shard_0-{line:07d}.json", name, doc)
        for line, (name, doc) in enumerate(positions, start=1)
        if name not in rejected
    ]
    assert sorted(records) == [key for key, _, _ in kept]
    for key, name, doc in kept:
        assert same(_without_images(records[key]), expected(doc, spelling)), name
    non_finite = sum(marks(doc) for _, _, doc in kept) if spelling in NON_FINITE else 0
    assert stats["counts"].get("values", {}) == (
        {"non_finite_as_null": non_finite} if non_finite else {}
    )
    assert stats["reasons"].get("documents", {}) == {CHECKED[name]: 1 for name in rejected}
    assert stats["counts"]["documents"]["written"] == len(kept)
    assert_balanced(stats)


def test_mmc4_a_non_finite_value_a_later_duplicate_key_replaces_is_not_counted(
    mmc4_sample: dict, tmp_path: Path
) -> None:
    """Only values that are written as null are counted: the last of two equal keys wins."""
    good = mmc4_sample["documents"][0][0]
    text = json.dumps(good)
    lines = [
        '{"x": NaN, "x": 1, ' + text[1:],
        '{"x": -Infinity, "x": [2], ' + text[1:],
        '{"x": 1, "x": 1e400, ' + text[1:],
    ]
    _write_mmc4_lines(mmc4_sample, lines)
    stats = _convert_mmc4(mmc4_sample, tmp_path / "out")
    records = tar_records(tmp_path / "out")
    assert [records[f"shard_0-000000{n}.json"]["x"] for n in (1, 2, 3)] == [1, [2], None]
    assert stats["counts"]["values"] == {"non_finite_as_null": 1}


def _drop(doc: dict, doc_fields: tuple[str, ...], info_fields: tuple[str, ...]) -> dict:
    doc = {k: v for k, v in copy.deepcopy(doc).items() if k not in doc_fields}
    doc["image_info"] = [
        {k: v for k, v in info.items() if k not in info_fields} for info in doc["image_info"]
    ]
    return doc


OPTIONAL_DROPS = [
    ((), ()),
    (("url",), ()),
    (("could_have_url_duplicate",), ()),
    ((), ("raw_url",)),
    ((), ("matched_sim",)),
    ((), ("face_detections",)),
    (("url", "could_have_url_duplicate"), ("raw_url", "matched_sim", "face_detections")),
]


def test_mmc4_fields_a_document_lacks_are_not_invented(mmc4_sample: dict, tmp_path: Path) -> None:
    """A document without ``matched_sim`` (or ``url``, ``raw_url``, ...) is written without it, not
    with a 0.0 or "" that the source never held; every other value comes back as it was."""
    good = mmc4_sample["documents"][0][0]
    docs = [_drop(good, doc_fields, info_fields) for doc_fields, info_fields in OPTIONAL_DROPS]
    _write_mmc4_lines(mmc4_sample, [json.dumps(doc) for doc in docs])
    stats = _convert_mmc4(mmc4_sample, tmp_path / "out")
    records = tar_records(tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": len(docs), "written": len(docs)}
    for line, doc in enumerate(docs, start=1):
        record = _without_images(records[f"shard_0-{line:07d}.json"])
        assert same(record, doc), OPTIONAL_DROPS[line - 1]


# ---------------------------------------------------------------- ChatGPT sequences


@pytest.fixture(scope="module")
def gpt_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """A finished img2dataset output holding two images, for ``images_from``."""
    root = tmp_path_factory.mktemp("gpt_images")
    urls = {f"_!_IMAGE{k}_!_": f"http://127.0.0.1:9/{k}.jpg" for k in (1, 2)}
    rows = [(url, "", make_image(k), "jpg") for k, url in enumerate(urls.values(), start=1)]
    write_img2dataset_output(root / "i2d", rows)
    return str(root / "i2d"), urls


def _gpt_sequences(urls: dict[str, str]) -> list[dict]:
    one, two = urls["_!_IMAGE1_!_"], urls["_!_IMAGE2_!_"]
    return [
        {"example": "A _!_IMAGE1_!_ b", "image_map": {"_!_IMAGE1_!_": {"url": one}}, "score": MARK},
        {
            "example": "_!_IMAGE1_!_ x _!_IMAGE2_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": one, "sim": MARK}, "_!_IMAGE2_!_": {"url": two}},
            "meta": {"nested": [1, MARK, {"deep": MARK}]},
        },
        {"example": "c _!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {"url": two, "w": [MARK]}}},
    ]


def _gpt_expected(sequence: dict, spelling: str) -> dict:
    record = expected(sequence, spelling)
    return {**record, "is_gpt": True}


@pytest.mark.parametrize("spelling", NON_FINITE + FINITE)
@pytest.mark.parametrize("layout", ["array", "jsonl"])
def test_chatgpt_extra_values_are_kept_or_written_as_null_and_counted_once(
    gpt_images: tuple[str, dict[str, str]], tmp_path: Path, spelling: str, layout: str
) -> None:
    images, urls = gpt_images
    sequences = _gpt_sequences(urls)
    texts = [spelled(s, spelling) for s in sequences]
    body = "[" + ", ".join(texts) + "]" if layout == "array" else "\n".join(texts) + "\n"
    (tmp_path / "seq.json").write_text(body)
    out = tmp_path / "out"
    convert_chatgpt(
        str(tmp_path / "seq.json"),
        ChatGptOptions(images_from=images),
        RunOptions(out_dir=str(out), converter="chatgpt", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    records, stats = tar_records(out), stats_of(out)
    keys = [f"seq-{n:07d}.json" for n in range(len(sequences))]
    assert sorted(records) == keys
    for key, sequence in zip(keys, sequences, strict=True):
        record = records[key]
        for entry in record["image_map"].values():
            assert base64.b64decode(entry.pop("base64_image"))
        assert same(record, _gpt_expected(sequence, spelling)), key
    non_finite = sum(map(marks, sequences)) if spelling in NON_FINITE else 0
    assert stats["counts"].get("values", {}) == (
        {"non_finite_as_null": non_finite} if non_finite else {}
    )
    assert stats["counts"]["documents"] == {"in": 3, "written": 3}
    assert_balanced(stats)


# ---------------------------------------------------------------- conversations


# (id as JSON text or None for no id, the key it must get, how many values become null)
CONVERSATION_IDS = [
    ('"plain-id_1"', "items-plain-id_1", 0),
    ("7", "items-7", 0),
    ('"trail\\n"', "items-0000000", 0),
    ('"\\nlead"', "items-0000000", 0),
    ('"a\\nb"', "items-0000000", 0),
    ('"dot.ted"', "items-0000000", 0),
    ('"trail\\r\\n"', "items-0000000", 0),
    ("true", "items-0000000", 0),
    ("1.5", "items-0000000", 0),
    ("null", "items-0000000", 0),
    ('["x"]', "items-0000000", 0),
    (None, "items-0000000", 0),
    *[(spelling, "items-0000000", 1) for spelling in NON_FINITE],
]


@pytest.mark.parametrize("form", ["interleaved", "gpt"])
@pytest.mark.parametrize(("id_text", "key", "non_finite"), CONVERSATION_IDS)
def test_conversation_ids_are_kept_as_they_are_and_keys_are_whole_safe_ids(
    tmp_path: Path, form: str, id_text: str | None, key: str, non_finite: int
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(make_image(1))
    item = {
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat?"},
            {"from": "gpt", "value": "A."},
        ],
    }
    text = json.dumps(item)
    if id_text is not None:
        text = '{"id": ' + id_text + ", " + text[1:]
    (tmp_path / "items.json").write_text("[" + text + "]")
    out = tmp_path / "out"
    convert_conversations(
        str(tmp_path / "items.json"),
        ConversationOptions(images=str(images), as_=form),
        RunOptions(out_dir=str(out), converter="conversations", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    records, stats = tar_records(out), stats_of(out)
    assert list(records) == [f"{key}.json"]
    record = records[f"{key}.json"]
    if id_text is None:
        assert "conversation_id" not in record
    else:
        assert same(record["conversation_id"], expected(MARK, id_text))
    assert stats["counts"].get("values", {}) == (
        {"non_finite_as_null": non_finite} if non_finite else {}
    )
    assert stats["counts"]["documents"] == {"in": 1, "written": 1}
    assert validate_shards(str(out)).ok


# ---------------------------------------------------------------- validate


def _shard_with_value(out: Path, spelling: str) -> None:
    record = interleaved_record(["A", "B"], [[0.3, 0.1]], [solid_jpeg((1, 2, 3))])
    record["extra"] = {"values": [1, MARK]}
    writer = ShardWriter(out, "v")
    writer.write("k", {"json": spelled(record, spelling).encode()})
    writer.close()


UNPORTABLE = [*NON_FINITE, str(2**64), str(-(2**63) - 1), str(10**30), "9" * 5000]
PORTABLE = ["1e308", "-0.0", "5e-324", str(2**64 - 1), str(-(2**63)), "12"]


@pytest.mark.parametrize("spelling", UNPORTABLE + PORTABLE)
def test_validate_reports_numbers_json_readers_disagree_on(tmp_path: Path, spelling: str) -> None:
    """NaN is not JSON; 1e400 is infinity to Python and an error to orjson (the loader); an
    integer beyond 64 bits is exact to Python and a float to orjson: a value changed. Numbers
    every reader reads alike pass."""
    _shard_with_value(tmp_path, spelling)
    report = validate_shards(str(tmp_path))
    if spelling in PORTABLE:
        assert report.ok, report.failures
        return
    assert [(f.key, f.reason) for f in report.failures] == [("k", "bad_json")]
    detail = report.failures[0].detail
    words = "not JSON" if spelling in ("NaN", "Infinity", "-Infinity") else "beyond"
    assert words in detail, detail


@pytest.mark.parametrize("suffix", ["\n", "\r\n"])
def test_validate_refuses_a_sizes_json_name_with_a_trailing_newline(
    tmp_path: Path, suffix: str
) -> None:
    writer = ShardWriter(tmp_path, "v")
    record = interleaved_record(["A"], [[0.3]], [solid_jpeg((1, 2, 3))])
    writer.write("k", {"json": json.dumps(record).encode()})
    writer.close()
    (shard,) = [p.name for p in tmp_path.glob("*.tar")]
    (tmp_path / "sizes.json").write_text(json.dumps({shard: 1, shard + suffix: 1}))
    report = validate_shards(str(tmp_path))
    assert [f.reason for f in report.failures] == ["sizes_schema"]
