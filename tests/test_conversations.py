"""Conversation JSON -> shards: every image lands at its tag, in both forms; bad items are counted rejects."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from flamingo_data.cli import main as cli
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.loader import LoaderConfig
from flamingo_data.loader.interleaved import plan_interleaved
from flamingo_data.samples import make_image
from flamingo_data.units import RunOptions
from flamingo_data.validate import validate_shards

H, G = "human", "gpt"


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


ITEMS = [
    {
        "id": "start",
        "image": "a.jpg",
        "conversations": [turn(H, "<image>\nWhat is this?"), turn(G, "A bird.")],
    },
    {
        "id": "end",
        "image": "b.png",
        "conversations": [turn(H, "Look at this <image>"), turn(G, "Nice.")],
    },
    {
        "id": "middle",
        "image": "a.jpg",
        "conversations": [turn(H, "Here <image> is it"), turn(G, "Yes.")],
    },
    {
        "id": "across",
        "image": ["a.jpg", "b.png"],
        "conversations": [
            turn(H, "<image> first"),
            turn(G, "ok"),
            turn(H, "second <image>"),
            turn(G, "done"),
        ],
    },
    {
        "id": "one-turn",
        "image": ["a.jpg", "b.png", "c.jpg"],
        "conversations": [
            turn(H, "Compare <image> with <image> and <image>."),
            turn(G, "Different."),
        ],
    },
    {
        "id": "notag",
        "image": "c.jpg",
        "conversations": [turn(H, "Describe."), turn(G, "A flamingo.")],
    },
    {
        "id": "unicode",
        "image": "a.jpg",
        "conversations": [turn(H, "<image> Что это? 这是什么 🦩"), turn(G, "Фламинго.")],
    },
    {"id": "too-many-tags", "image": "a.jpg", "conversations": [turn(H, "<image> and <image>")]},
    {"id": "too-few-tags", "image": ["a.jpg", "b.png"], "conversations": [turn(H, "only <image>")]},
    {"id": "missing", "image": "nope.jpg", "conversations": [turn(H, "<image>")]},
    {"id": "escape", "image": "../outside.jpg", "conversations": [turn(H, "<image>")]},
    {"id": "absolute", "image": "/etc/passwd", "conversations": [turn(H, "<image>")]},
    {"id": "start", "image": "a.jpg", "conversations": [turn(H, "<image> duplicate id")]},
    {"id": "text-only", "conversations": [turn(H, "hello")]},
]
GOOD = ["start", "end", "middle", "across", "one-turn", "notag", "unicode"]
REJECTED = {
    "too-many-tags": "tag_count_mismatch",
    "too-few-tags": "tag_count_mismatch",
    "missing": "missing_image",
    "escape": "unsafe_image_path",
    "absolute": "unsafe_image_path",
    "text-only": "no_images",
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(("a.jpg", "b.png", "c.jpg")):
        (images / name).write_bytes(make_image(seed, fmt="PNG" if name.endswith("png") else "JPEG"))
    (tmp_path / "outside.jpg").write_bytes(make_image(9))
    (tmp_path / "data.json").write_text(json.dumps(ITEMS, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def convert(data: Path, as_: str, source: str = "data.json") -> tuple[dict, dict[str, dict]]:
    out = data / f"out-{as_}"
    stats = convert_conversations(
        str(data / source),
        ConversationOptions(images=str(data / "images"), as_=as_),
        RunOptions(out_dir=str(out), converter="conversations", write_rejects=True),
        processes=1,
        progress=False,
    )
    assert validate_shards(str(out), deep=True).ok
    records = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar:
                records[member.name.removesuffix(".json")] = json.loads(
                    tar.extractfile(member).read()
                )
    return stats.to_json(), records


def test_counts_and_reasons(data: Path) -> None:
    stats, records = convert(data, "interleaved")
    assert stats["counts"]["documents"] == {"in": 14, "written": 8, "rejected": 6}
    assert stats["reasons"]["documents"] == {
        "tag_count_mismatch": 2,
        "missing_image": 1,
        "unsafe_image_path": 2,
        "no_images": 1,
    }
    assert stats["counts"]["keys"] == {"duplicate_id": 1}
    assert {f"data-{i}" for i in GOOD} <= set(records) and "data-0000012" in records
    rejects = {
        json.loads(line)["key"]: json.loads(line)["reason"]
        for line in (data / "out-interleaved" / "rejects.jsonl").read_text().splitlines()
    }
    assert rejects == {f"data-{k}": v for k, v in REJECTED.items()}


def image_sentences(record: dict) -> list[tuple[str, str]]:
    """(image name, the sentence the loader will put it before), in text order, via the loader's own plan."""
    plan = plan_interleaved(record, LoaderConfig())
    assert not plan.dropped and len(plan.placements) == len(record["image_info"])
    return [
        (record["image_info"][p.image_index]["image_name"], record["text_list"][p.sentence_index])
        for p in plan.placements
    ]


def test_interleaved_places_each_image_at_its_tag(data: Path) -> None:
    _, records = convert(data, "interleaved")
    assert image_sentences(records["data-start"]) == [("a.jpg", "What is this?")]
    assert records["data-start"]["text_list"] == ["User:", "What is this?", "Assistant: A bird."]
    assert image_sentences(records["data-end"]) == [("b.png", "")]
    assert records["data-end"]["text_list"] == ["User: Look at this", "", "Assistant: Nice."]
    assert image_sentences(records["data-middle"]) == [("a.jpg", "is it")]
    assert image_sentences(records["data-across"]) == [("a.jpg", "first"), ("b.png", "")]
    assert image_sentences(records["data-one-turn"]) == [
        ("a.jpg", "with"),
        ("b.png", "and"),
        ("c.jpg", "."),
    ]
    assert image_sentences(records["data-notag"]) == [("c.jpg", "User: Describe.")]
    assert image_sentences(records["data-unicode"]) == [("a.jpg", "Что это? 这是什么 🦩")]


def test_similarity_matrix_reproduces_the_placement_under_hungarian(data: Path) -> None:
    _, records = convert(data, "interleaved")
    for record in records.values():
        sim = np.array(record["similarity_matrix"])
        assert sim.shape == (len(record["image_info"]), len(record["text_list"]))
        rows, cols = linear_sum_assignment(-sim)
        assert [int(c) for c in cols] == [i["matched_text_index"] for i in record["image_info"]]
        assert (sim[rows, cols] >= 0.24).all()


def test_real_image_bytes_are_embedded(data: Path) -> None:
    _, records = convert(data, "interleaved")
    info = records["data-across"]["image_info"]
    assert base64.b64decode(info[1]["image_base64"]) == (data / "images" / "b.png").read_bytes()


def test_gpt_form_keeps_the_exact_character_position(data: Path) -> None:
    _, records = convert(data, "gpt")
    assert records["data-middle"]["example"] == "User: Here _!_IMAGE1_!_ is it\nAssistant: Yes."
    assert records["data-one-turn"]["example"].startswith(
        "User: Compare _!_IMAGE1_!_ with _!_IMAGE2_!_ and _!_IMAGE3_!_."
    )
    assert records["data-notag"]["example"] == "_!_IMAGE1_!_User: Describe.\nAssistant: A flamingo."
    images = records["data-one-turn"]["image_map"]
    assert [images[f"_!_IMAGE{k}_!_"]["image_name"] for k in (1, 2, 3)] == [
        "a.jpg",
        "b.png",
        "c.jpg",
    ]
    assert (
        base64.b64decode(images["_!_IMAGE3_!_"]["base64_image"])
        == (data / "images" / "c.jpg").read_bytes()
    )


def test_jsonl_input_and_cli_with_template(data: Path) -> None:
    lines = [json.dumps(item, ensure_ascii=False) for item in ITEMS[:3]] + ["{broken"]
    (data / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = cli(
        [
            "convert",
            "conversations",
            "--json",
            str(data / "items.jsonl"),
            "--images",
            str(data / "images"),
            "--out",
            str(data / "cli"),
            "--template",
            "Q: {value}",
            "A: {value}",
            "--no-progress",
            "--rejects",
        ]
    )
    assert code == 0
    stats = json.loads((data / "cli" / "stats.json").read_text())
    assert stats["counts"]["documents"] == {"in": 4, "written": 3, "rejected": 1}
    assert stats["reasons"]["documents"] == {"bad_json": 1}
    with tarfile.open(next((data / "cli").glob("*.tar"))) as tar:
        record = json.loads(tar.extractfile("items-start.json").read())
    assert record["text_list"] == ["Q:", "What is this?", "A: A bird."]
