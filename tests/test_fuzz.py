"""Property-based fuzzing of every converter's per-item path: no uncaught exception, and every input is
either written (and then passes validate's per-record checks) or counted as rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flamingo_data.check.validate import ValidateOptions, ValidationReport, check_sample
from flamingo_data.converters import chatgpt, conversations, mmc4
from flamingo_data.converters import laion_shards as paircheck
from flamingo_data.core.stats import Stats
from flamingo_data.demo.sample_data import make_document, make_image
from flamingo_data.images.stage import ImagePolicy, process_image, sniff_format
from flamingo_data.run.units import Unit, UnitContext
from flamingo_data.storage.shard_reader import Sample

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
ODD_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40
) | st.sampled_from(
    [
        "\u202e\u0000<script>",
        "🦩" * 50,
        "\ud7ff",
        "_!_IMAGE1_!_",
        "<image><image>",
        "../../etc/passwd",
        "a.b.c",
    ]
)


class Recorder:
    """Stands in for the shard writer: keeps what would be written."""

    def __init__(self) -> None:
        self.written: dict[str, dict[str, bytes]] = {}

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.written[key] = members


def context() -> UnitContext:
    return UnitContext(Unit("u", "src", 0), Recorder(), Stats())


def mutate(data: Any, draw) -> Any:
    """One structural mutation of a JSON value: replace, delete, wrap deeply, or change type."""
    if isinstance(data, dict) and data:
        key = draw(st.sampled_from(sorted(data)))
        choice = draw(st.integers(0, 3))
        out = dict(data)
        if choice == 0:
            del out[key]
        elif choice == 1:
            out[key] = draw(JSON)
        elif choice == 2:
            out[key] = mutate(data[key], draw)
        else:
            out[key] = [[[[data[key]]]]]
        return out
    if isinstance(data, list) and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + [mutate(data[i], draw)] + data[i + 1 :]
    return draw(JSON | ODD_TEXT)


def mutate_bytes(raw: bytes, draw) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return raw[: draw(st.integers(0, len(raw)))]
    if choice == 1:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1 :]
    return raw


def assert_accounted(ctx: UnitContext, kind: str) -> None:
    """Exactly one outcome per input, and what was written is fit for training."""
    docs = ctx.stats.counts["documents"]
    assert docs["in"] == docs["written"] + docs["rejected"] == 1
    if docs["rejected"]:
        assert sum(ctx.stats.reasons["documents"].values()) == 1
    for key, members in ctx.writer.written.items():
        problems = check_sample(
            Sample("s.tar", key, members), ValidateOptions(kind=kind), ValidationReport()
        )
        assert problems == [], problems


@pytest.fixture(scope="module")
def mmc4_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import numpy as np

    folder = tmp_path_factory.mktemp("mmc4img")
    doc = make_document(np.random.default_rng(0), "fz", 3, 2)
    for i, info in enumerate(doc["image_info"]):
        (folder / info["image_name"]).write_bytes(make_image(i, 40, 30))
    return folder, doc


@FUZZ
@given(st.data())
def test_fuzz_mmc4_lines(mmc4_folder, data) -> None:
    folder, doc = mmc4_folder
    mutated = mutate(doc, data.draw) if data.draw(st.booleans()) else doc
    raw = json.dumps(mutated, allow_nan=True).encode()
    raw = mutate_bytes(raw, data.draw)
    ctx = context()
    mmc4.convert_line(raw, "u-1", folder, ctx, mmc4.Mmc4Options(images=str(folder)))
    assert_accounted(ctx, "interleaved")


class Store:
    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images

    def get(self, url: str, limit: int | None = None) -> tuple[bytes | None, str]:
        data = self.images.get(url)
        if data is None:
            return None, "not_downloaded"
        return data[:limit], ""


GPT = {
    "example": "A _!_IMAGE1_!_ b _!_IMAGE2_!_ c",
    "image_map": {"_!_IMAGE1_!_": {"url": "http://x/1"}, "_!_IMAGE2_!_": {"raw_url": "http://x/2"}},
}


@FUZZ
@given(st.data(), st.sampled_from(["drop", "strip"]))
def test_fuzz_gpt_sequences(data, missing: str) -> None:
    store = Store(
        {
            "http://x/1": make_image(1, 30, 20),
            "http://x/2": make_image(2, 30, 20)[: data.draw(st.sampled_from([10**6, 300]))],
        }
    )
    item = mutate(GPT, data.draw) if data.draw(st.booleans()) else GPT
    ctx = context()
    chatgpt.convert_sequence(item, "u-1", store, chatgpt.ChatGptOptions(missing=missing), ctx)
    assert_accounted(ctx, "gpt")


@pytest.fixture(scope="module")
def conv_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("convimg")
    (folder / "a.jpg").write_bytes(make_image(1, 30, 20))
    (folder / "b.png").write_bytes(make_image(2, 30, 20, "PNG"))
    return folder


CONV = {
    "id": "x1",
    "image": ["a.jpg", "b.png"],
    "conversations": [
        {"from": "human", "value": "<image> look <image>"},
        {"from": "gpt", "value": "nice"},
    ],
}


@FUZZ
@given(st.data(), st.sampled_from(["interleaved", "gpt"]))
def test_fuzz_conversation_items(conv_folder: Path, data, as_: str) -> None:
    item = mutate(CONV, data.draw) if data.draw(st.booleans()) else CONV
    ctx = context()
    ctx.stats.add("documents", "in")
    try:
        record, _outcomes = conversations.convert_item(
            item, conversations.ConversationOptions(images=str(conv_folder), as_=as_)
        )
        encoded = conversations.encode_item(record)  # as convert_entry writes it
    except conversations.ItemError as exc:
        ctx.reject("documents", "u-1", exc.args[0])
    else:
        ctx.write_record("u-1", encoded)
        ctx.stats.add("documents", "written")
    assert_accounted(ctx, as_)


@FUZZ
@given(st.data())
def test_fuzz_parquet_rows_after_download(data) -> None:
    """LAION rows as img2dataset stores them; our per-sample check must classify, never crash."""
    members = {
        "jpg": make_image(3, 30, 20),
        "txt": b"a caption",
        "json": json.dumps({"key": "k", "url": "u"}).encode(),
    }
    target = data.draw(st.sampled_from(sorted(members) + ["drop"]))
    if target == "drop":
        members.pop(data.draw(st.sampled_from(sorted(members))))
    else:
        members[target] = mutate_bytes(members[target], data.draw)
    verdict = paircheck.check_sample(members, ImagePolicy())
    if verdict.image is not None:  # the sample is written with the stage's image
        members = {e: d for e, d in members.items() if e not in ("jpg", "png", "webp")}
        members[verdict.image[0]] = verdict.image[1]
    if verdict.reason is None:
        assert (
            check_sample(
                Sample("s.tar", "k", members), ValidateOptions(kind="pair"), ValidationReport()
            )
            == []
        )


IMAGES = [make_image(4, 40, 30, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")]


@FUZZ
@given(st.data())
def test_fuzz_image_bytes(data) -> None:
    raw = mutate_bytes(data.draw(st.sampled_from(IMAGES)), data.draw)
    result = process_image(raw, ImagePolicy(short_side=data.draw(st.sampled_from([None, 16]))))
    assert result.outcome in ("kept", "trimmed", "converted", "resized", "rejected")
    if result.ok:
        assert sniff_format(result.data) in ("jpeg", "png", "webp") and result.width > 0
    else:
        assert result.reason and result.data is None


OBELICS = {
    "images": ["http://x/1", None, "http://x/2", None],
    "metadata": [{"src": "http://x/1"}, None, {"src": "http://x/2"}, None],
    "general_metadata": {"url": "https://example.org/page"},
    "texts": [None, "A cat.", None, "The end."],
}


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_obelics_documents(data, as_strings: bool) -> None:
    """Mutated documents (metadata as objects or as OBELICS's JSON strings), through the line
    reader's parse and the converter: one outcome each, and what is written validates."""
    from flamingo_data.converters import obelics, obelics_read
    from flamingo_data.fetch.url_images import UrlImages

    store = Store({"http://x/1": make_image(1, 30, 20), "http://x/2": make_image(2, 30, 20)})
    doc = dict(OBELICS)
    if as_strings:
        doc.update({k: json.dumps(doc[k]) for k in ("metadata", "general_metadata")})
    item = mutate(doc, data.draw) if data.draw(st.booleans()) else doc
    raw = mutate_bytes(json.dumps(item, allow_nan=True).encode(), data.draw)
    ctx = context()
    options = obelics.ObelicsOptions(images=UrlImages("unused"))
    obelics.convert_document(obelics_read.line_item(raw), "u-1", store, ctx, options)
    assert_accounted(ctx, "interleaved")
