"""Conversation JSON -> shards: every image lands at its tag, in both forms; bad items are counted rejects.

The expected placements are computed here from the *input* (text after the k-th tag, or the text with
the k-th tag replaced by its placeholder), then compared with what is read back from the real tars.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.demo.sample_data import make_image
from flamingo_data.loader import LoaderConfig
from flamingo_data.loader.interleaved import plan_interleaved
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions

H, G = "human", "gpt"
TEMPLATE = {"human": "User: {value}", "gpt": "Assistant: {value}"}


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
        "id": "notag-two",
        "image": ["c.jpg", "sub/d.jpg"],
        "conversations": [turn(H, "Both?"), turn(G, "Both.")],
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
    {"id": "narrator", "image": "a.jpg", "conversations": [turn("narrator", "<image> brief")]},
    {"id": "eoc", "image": "a.jpg", "conversations": [turn(H, "<image> x <|endofchunk|> y")]},
    {"id": "surrogate", "image": "a.jpg", "conversations": [turn(H, "<image> \ud800")]},
    {"id": "a.b/c", "image": "b.png", "conversations": [turn(H, "<image> unsafe id")]},
]
GOOD = ["start", "end", "middle", "across", "one-turn", "notag", "notag-two", "unicode"]
REJECTED = {
    "too-many-tags": "tag_count_mismatch",
    "too-few-tags": "tag_count_mismatch",
    "missing": "missing_image",
    "escape": "unsafe_image_path",
    "absolute": "unsafe_image_path",
    "text-only": "no_images",
    "narrator": "unknown_role",
    "eoc": "special_token_in_text",
    "surrogate": "invalid_unicode",
}
BY_KEY = {f"data-{item['id']}": item for item in ITEMS[:13]} | {
    "data-0000013": ITEMS[13],  # duplicate id -> key from (file, index)
    "data-0000018": ITEMS[18],  # unsafe id -> key from (file, index)
}


def write_images(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    for seed, name in enumerate(("a.jpg", "b.png", "c.jpg", "sub/d.jpg")):
        (folder / name).write_bytes(make_image(seed, fmt="PNG" if name.endswith("png") else "JPEG"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conv")
    write_images(root / "images")
    (root / "outside.jpg").write_bytes(make_image(9))
    # ensure_ascii: the lone surrogate can only exist as a \ud800 escape in a JSON file
    (root / "data.json").write_text(json.dumps(ITEMS, ensure_ascii=True), encoding="utf-8")
    return root


def read_records(out: Path) -> dict[str, bytes]:
    records = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                records[member.name.removesuffix(".json")] = tar.extractfile(member).read()
    return records


def convert(data: Path, as_: str, name: str, chunk_size: int = 10_000) -> tuple[dict, dict]:
    out = data / name
    stats = convert_conversations(
        str(data / "data.json"),
        ConversationOptions(images=str(data / "images"), as_=as_),
        RunOptions(out_dir=str(out), converter="conversations", write_rejects=True),
        chunk_size=chunk_size,
        execution=Execution(processes=1, progress=False),
    )
    report = validate_shards(str(out), deep=True)
    assert report.ok, report.to_json()["failures"]
    return stats.to_json(), {k: json.loads(v) for k, v in read_records(out).items()}


@pytest.fixture(scope="module")
def interleaved(data: Path) -> tuple[dict, dict]:
    return convert(data, "interleaved", "out-interleaved")


@pytest.fixture(scope="module")
def gpt(data: Path) -> tuple[dict, dict]:
    return convert(data, "gpt", "out-gpt")


def names_of(item: dict) -> list[str]:
    return [item["image"]] if isinstance(item["image"], str) else item["image"]


def rendered(item: dict) -> list[str]:
    return [TEMPLATE[t["from"]].replace("{value}", t["value"]) for t in item["conversations"]]


def expected_sentences(item: dict) -> list[str]:
    """The text each image should introduce: after its tag up to the next tag or the turn's end,
    a newline when that is blank."""
    turns = rendered(item)
    if "<image>" not in "".join(turns):
        return ["\n"] * (len(names_of(item)) - 1) + [turns[0]]
    return [part.strip() or "\n" for text in turns for part in text.split("<image>")[1:]]


def expected_example(item: dict) -> str:
    numbers = itertools.count(1)
    text = "\n".join(rendered(item))
    if "<image>" not in text:
        text = "<image>" * len(names_of(item)) + text
    return re.sub("<image>", lambda _: f"_!_IMAGE{next(numbers)}_!_", text)


def test_counts_reasons_and_keys(data: Path, interleaved: tuple[dict, dict]) -> None:
    stats, records = interleaved
    assert stats["counts"]["documents"] == {"in": 19, "written": 10, "rejected": 9}
    assert stats["counts"]["images"] == {"written": 14, "kept": 14}  # all whole JPEG/PNG
    assert stats["reasons"]["documents"] == {
        "tag_count_mismatch": 2,
        "missing_image": 1,
        "unsafe_image_path": 2,
        "no_images": 1,
        "unknown_role": 1,
        "special_token_in_text": 1,
        "invalid_unicode": 1,
    }
    assert stats["counts"]["keys"] == {"duplicate_id": 1, "derived": 1}
    assert set(records) == {f"data-{i}" for i in GOOD} | {"data-0000013", "data-0000018"}
    rejects = [json.loads(line) for line in (data / "out-interleaved/rejects.jsonl").open()]
    assert {r["key"]: r["reason"] for r in rejects} == {f"data-{k}": v for k, v in REJECTED.items()}
    assert not (data / "out-interleaved/_chunks").exists()


def test_interleaved_hungarian_with_threshold_reproduces_every_placement(interleaved) -> None:
    _, records = interleaved
    for key, record in records.items():
        item = BY_KEY[key]
        sim = np.array(record["similarity_matrix"])
        assert sim.shape == (len(record["image_info"]), len(record["text_list"]))
        rows, cols = linear_sum_assignment(sim, maximize=True)
        assert (sim[rows, cols] >= 0.24).all()
        placed = [record["text_list"][c] for c in cols]
        assert placed == expected_sentences(item), key
        assert [int(c) for c in cols] == [i["matched_text_index"] for i in record["image_info"]]
        assert [i["image_name"] for i in record["image_info"]] == names_of(item)


def test_interleaved_examples_read_by_the_loader(interleaved) -> None:
    _, records = interleaved
    assert records["data-start"]["text_list"] == ["User:", "What is this?", "Assistant: A bird."]
    assert records["data-one-turn"]["text_list"][:4] == ["User: Compare", "with", "and", "."]
    for key, record in records.items():
        plan = plan_interleaved(record, LoaderConfig(max_images=6))
        assert not plan.dropped and len(plan.placements) == len(record["image_info"]), key
        assert [p.sentence_index for p in plan.placements] == [
            i["matched_text_index"] for i in record["image_info"]
        ]


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_loader_batches_have_the_turns_in_order_and_each_image_at_its_tag(
    as_: str, tmp_path: Path
) -> None:
    """Read back through the loader: the k-th ``<image>`` token of a sample is the k-th image
    (solid colours tell them apart), and the turns keep their order around the images."""
    import torch

    from flamingo_data.loader import DatasetSpec, build_loader, make_tokenizer
    from tests.loader_data import solid_jpeg

    colours = {"r.jpg": 0, "g.jpg": 1, "b.jpg": 2}
    (tmp_path / "images").mkdir()
    for name, channel in colours.items():
        rgb = tuple(250 if c == channel else 0 for c in range(3))
        (tmp_path / "images" / name).write_bytes(solid_jpeg(rgb, (64, 48)))
    items = [
        {
            "id": "three",
            "image": ["b.jpg", "r.jpg", "g.jpg"],
            "conversations": [
                turn(H, "first <image> then <image>"),
                turn(G, "ok"),
                turn(H, "and <image>\nlast"),
                turn(G, "done"),
            ],
        },
        {
            "id": "notag",
            "image": ["g.jpg", "b.jpg"],
            "conversations": [turn(H, "Both?"), turn(G, "y")],
        },
    ]
    (tmp_path / "c.json").write_text(json.dumps(items))
    args = ["--json", str(tmp_path / "c.json"), "--images", str(tmp_path / "images")]
    assert run_cli(*args, "--out", str(tmp_path / "out"), "--as", as_) == 0
    tokenizer = make_tokenizer(None)
    config = LoaderConfig(batch_size=2, image_size=32, shuffle_shards=False, flip_prob=0.0)
    [batch] = list(build_loader([DatasetSpec("c", str(tmp_path / "out"))], tokenizer, config))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    seen = {}
    for i, key in enumerate(batch["keys"]):
        ids = batch["lang_x"][i][batch["attention_mask"][i].bool()]
        text = tokenizer.decode(ids).replace("<|endofchunk|>", "")
        text = re.sub(r"\s*<image>\s*", "<image>", " ".join(text.split()))  # gpt keeps newlines
        pixels = batch["vision_x"][i, : int((ids == image_id).sum()), 0]
        seen[key] = (text, [int(torch.argmax(p.reshape(3, -1).mean(dim=1))) for p in pixels])
    assert seen == {
        "c-three": (
            "User: first<image>then<image>Assistant: ok User: and<image>last Assistant: done"
            "<|endoftext|>",
            [2, 0, 1],
        ),
        "c-notag": ("<image><image>User: Both? Assistant: y<|endoftext|>", [1, 2]),
    }


def test_real_image_bytes_are_embedded(data: Path, interleaved, gpt) -> None:
    for record in interleaved[1].values():
        for info in record["image_info"]:
            source = (data / "images" / info["image_name"]).read_bytes()
            assert base64.b64decode(info["image_base64"]) == source
    image = gpt[1]["data-notag-two"]["image_map"]["_!_IMAGE2_!_"]
    assert base64.b64decode(image["base64_image"]) == (data / "images/sub/d.jpg").read_bytes()


def test_gpt_form_keeps_the_exact_character_position(gpt) -> None:
    stats, records = gpt
    assert stats["counts"]["documents"]["written"] == 10
    for key, record in records.items():
        item = BY_KEY[key]
        assert record["is_gpt"] is True
        assert record["example"] == expected_example(item), key
        placeholders = [f"_!_IMAGE{k}_!_" for k in range(1, len(names_of(item)) + 1)]
        assert sorted(record["image_map"]) == placeholders
        assert [record["image_map"][p]["image_name"] for p in placeholders] == names_of(item)
    middle = records["data-middle"]["example"]
    assert middle == "User: Here _!_IMAGE1_!_ is it\nAssistant: Yes."
    assert middle.index("_!_IMAGE1_!_") == len("User: Here ")
    assert records["data-notag"]["example"] == "_!_IMAGE1_!_User: Describe.\nAssistant: A flamingo."


def test_chunks_give_the_same_records_and_keys(data: Path, interleaved) -> None:
    stats, _ = convert(data, "interleaved", "out-chunked", chunk_size=4)
    assert stats["counts"]["units"] == {"done": 5}
    markers = sorted(p.stem for p in (data / "out-chunked/_done").glob("*.json"))
    assert markers == [f"data-c0000{k}" for k in range(5)]  # items 8-11 are all rejects: no shard
    assert len(list((data / "out-chunked").glob("data-c0000[0-4]-00000.tar"))) == 4
    # the duplicate id sits in another chunk than its first use and is still caught
    assert read_records(data / "out-chunked") == read_records(data / "out-interleaved")
    assert stats["counts"]["keys"] == interleaved[0]["counts"]["keys"]


def run_cli(*args: str) -> int:
    return cli(["convert", "conversations", *args, "--no-progress", "--rejects"])


def test_cli_jsonl_folder_template_and_resume(data: Path) -> None:
    folder = data / "jsonl-in"
    folder.mkdir()
    lines = [json.dumps(item, ensure_ascii=False) for item in ITEMS[:8]] + ["{broken"]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "bom.json").write_text("\ufeff" + json.dumps(ITEMS[:2]), encoding="utf-8")
    (folder / "bad.json").write_text("[{", encoding="utf-8")
    # "items-one" + "turn" would be the key of "items" + "one-turn": the later one is derived
    (folder / "items-one.json").write_text(json.dumps([ITEMS[0] | {"id": "turn"}]), "utf-8")
    out = data / "cli"
    common = ["--json", str(folder), "--images", str(data / "images"), "--out", str(out)]
    template = ["--template", "Q: {value}", "A: {value}"]
    assert run_cli(*common, *template, "--chunk-size", "3") == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["documents"] == {"in": 12, "written": 11, "rejected": 1}
    assert stats["reasons"] == {"documents": {"bad_json": 1}, "units": {"unreadable_json": 1}}
    assert stats["counts"]["keys"] == {"duplicate_id": 1, "derived": 1}  # + the bad line
    records = {k: json.loads(v) for k, v in read_records(out).items()}
    assert records["items-one-turn"]["conversation_id"] == "turn"
    assert records["items-0000004"]["conversation_id"] == "one-turn"
    assert records["items-start"]["text_list"] == ["Q:", "What is this?", "A: A bird."]
    assert records["bom-end"]["text_list"] == ["Q: Look at this", "\n", "A: Nice."]
    assert records["items-unicode"]["text_list"][1] == "Что это? 这是什么 🦩"

    before = read_records(out)
    victim = out / "_done/items-c00001.json"
    for shard in json.loads(victim.read_text())["shards"]:
        (out / shard).unlink()
    victim.unlink()  # as if that unit had been killed mid-way
    assert run_cli(*common, *template, "--chunk-size", "3", "--resume") == 0
    assert read_records(out) == before
    assert run_cli(*common, *template, "--chunk-size", "4", "--resume") == 2
    assert validate_shards(str(out), deep=True).ok


def test_cli_refuses_a_template_without_value(data: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(
            "--json",
            str(data / "data.json"),
            "--images",
            str(data / "images"),
            "--out",
            str(data / "never"),
            "--template",
            "User:",
            "A: {value}",
        )
    assert exc.value.code == 2
    assert "{value} exactly once" in capsys.readouterr().err
    assert not (data / "never").exists()


def test_openflamingo_guide_shape_needs_no_change(tmp_path: Path) -> None:
    """A list of {id, image: [paths], conversations}, ids like UUIDs, images in sub-folders."""
    write_images(tmp_path / "images")
    guide = [
        {
            "id": "997bb945-628d-4724-b370-b84de974a19f",
            "image": ["sub/d.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\nWrite a prompt to generate this image."},
                {"from": "gpt", "value": "a photo, warm light, high detail"},
            ],
        },
        {
            "id": "0b2c8f0e-43f4-4c8a-9d1a-6f0c7f5e2b11",
            "image": ["a.jpg", "c.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat changed?"},
                {"from": "gpt", "value": "The colours."},
            ],
        },
    ]
    (tmp_path / "train.json").write_text(json.dumps(guide, indent=2), encoding="utf-8")
    out = tmp_path / "shards"
    args = ["--json", str(tmp_path / "train.json"), "--images", str(tmp_path / "images")]
    assert run_cli(*args, "--out", str(out)) == 0
    assert cli(["validate", str(out), "--deep"]) == 0
    records = {k: json.loads(v) for k, v in read_records(out).items()}
    second = records["train-0b2c8f0e-43f4-4c8a-9d1a-6f0c7f5e2b11"]
    assert second["text_list"] == ["User:", "\n", "What changed?", "Assistant: The colours."]
    assert [i["matched_text_index"] for i in second["image_info"]] == [1, 2]


def convert_file(
    tmp_path: Path, name: str, text: str, *extra: str, code: int = 0
) -> tuple[dict, dict, list]:
    """Convert one input file through the CLI (exit ``code``: 1 when it writes nothing);
    (stats, records by key, rejects)."""
    write_images(tmp_path / "images")
    (tmp_path / name).write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    args = ["--json", str(tmp_path / name), "--images", str(tmp_path / "images"), *extra]
    assert run_cli(*args, "--out", str(out), "--processes", "1") == code
    assert cli(["validate", str(out), "--deep"]) == 0 or not list(out.glob("*.tar"))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    return stats, {k: json.loads(v) for k, v in read_records(out).items()}, rejects


def test_a_bad_jsonl_line_is_one_reject_and_u2028_does_not_split_a_line(tmp_path: Path) -> None:
    """One bad line (a 5000-digit integer, nesting deeper than the parser goes or than a chunk
    round trip survives) lost the whole file; U+2028 inside a string cut its line in three."""
    good = [
        {"id": f"g{i}", "image": "a.jpg", "conversations": [turn(H, "<image> hi")]}
        for i in range(3)
    ]
    spaced = {"id": "ls", "image": "a.jpg", "conversations": [turn(H, "<image> a\u2028b\x85c")]}
    lines = [json.dumps(good[0]), '{"x": ' + "1" * 5000 + "}", "[" * 980 + "]" * 980]
    lines += ["[" * 5000 + "]" * 5000, json.dumps(spaced, ensure_ascii=False), json.dumps(good[1])]
    stats, records, rejects = convert_file(tmp_path, "d.jsonl", "\r\n".join(lines) + "\r\n")
    assert stats["counts"]["documents"] == {"in": 6, "written": 3, "rejected": 3}
    assert [r["reason"] for r in rejects] == ["bad_json"] * 3
    assert records["d-ls"]["text_list"][1] == "a\u2028b\x85c"


def test_a_lone_surrogate_in_an_image_path_is_a_reject_not_a_crash(tmp_path: Path) -> None:
    items = [
        {"id": "bad", "image": "a\ud800.jpg", "conversations": [turn(H, "<image>")]},
        {"id": "ok", "image": "a.jpg", "conversations": [turn(H, "<image>")]},
    ]
    stats, records, rejects = convert_file(tmp_path, "s.json", json.dumps(items))
    assert list(records) == ["s-ok"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("s-bad", "invalid_unicode")]


def test_windows_backslash_paths_read_the_same_file_as_on_remote_storage(tmp_path: Path) -> None:
    """``sub\\d.jpg`` (a JSON written on Windows) was missing_image in a local folder, though the
    same path was read as ``sub/d.jpg`` from remote storage; ``..\\`` still may not climb out."""
    (tmp_path / "outside.jpg").write_bytes(make_image(9))
    items = [
        {"id": "win", "image": "sub\\d.jpg", "conversations": [turn(H, "<image> hi")]},
        {"id": "up", "image": "..\\outside.jpg", "conversations": [turn(H, "<image> hi")]},
    ]
    _, records, rejects = convert_file(tmp_path, "w.json", json.dumps(items))
    image = records["w-win"]["image_info"][0]
    assert base64.b64decode(image["image_base64"]) == (tmp_path / "images/sub/d.jpg").read_bytes()
    assert image["image_name"] == "sub\\d.jpg"  # as the input named it
    assert [(r["key"], r["reason"]) for r in rejects] == [("w-up", "unsafe_image_path")]


def test_a_symlink_loop_among_the_images_is_one_reject_not_a_failed_run(tmp_path: Path) -> None:
    """pathlib raises RuntimeError on a symlink loop: the whole run stopped, exit 2."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images/loop.jpg").symlink_to("loop.jpg")  # convert_file adds the real images
    items = [
        {"id": "loop", "image": "loop.jpg", "conversations": [turn(H, "<image> hi")]},
        {"id": "ok", "image": "a.jpg", "conversations": [turn(H, "<image> hi")]},
    ]
    _, records, rejects = convert_file(tmp_path, "l.json", json.dumps(items))
    assert list(records) == ["l-ok"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("l-loop", "missing_image")]


def test_a_symlinked_image_folder_is_followed_and_paths_are_judged_as_written(
    tmp_path: Path,
) -> None:
    """LLaVA's layout links ``coco`` to shared storage: every image in it was unsafe_image_path,
    as was a file named ``..x.jpg`` on remote storage. Only the JSON's own text may not climb out."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "e.jpg").write_bytes(make_image(7))
    (tmp_path / "images").mkdir()
    (tmp_path / "images/coco").symlink_to(shared, target_is_directory=True)
    (tmp_path / "images/..x.jpg").write_bytes(make_image(8))
    items = [
        {"id": "linked", "image": "coco/e.jpg", "conversations": [turn(H, "<image> hi")]},
        {"id": "dots", "image": "..x.jpg", "conversations": [turn(H, "<image> hi")]},
        {"id": "climb", "image": "coco/../../shared/e.jpg", "conversations": [turn(H, "<image>")]},
        {"id": "drive", "image": "C:\\shared\\e.jpg", "conversations": [turn(H, "<image>")]},
    ]
    _, records, rejects = convert_file(tmp_path, "k.json", json.dumps(items))
    linked = records["k-linked"]["image_info"][0]["image_base64"]
    assert base64.b64decode(linked) == (shared / "e.jpg").read_bytes()
    assert base64.b64decode(records["k-dots"]["image_info"][0]["image_base64"]) == make_image(8)
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("k-climb", "unsafe_image_path"),
        ("k-drive", "unsafe_image_path"),
    ]


def test_images_key_and_system_turns(tmp_path: Path) -> None:
    """``images`` (Mantis, LLaMA-Factory) reads as ``image`` did (every such item was no_images);
    both keys at once is refused; a system turn is rendered as plain text, or with
    --system-template, and ``--system-template reject`` rejects its item."""
    system = {"from": "system", "value": "Be brief."}
    items = [
        {
            "id": "plural",
            "images": ["a.jpg", "b.png"],
            "conversations": [turn(H, "<image><image>")],
        },
        {
            "id": "both",
            "image": "a.jpg",
            "images": ["a.jpg"],
            "conversations": [turn(H, "<image>")],
        },
        {"id": "sys", "image": "a.jpg", "conversations": [system, turn(H, "<image> hi")]},
    ]
    text = json.dumps(items)
    _, records, rejects = convert_file(tmp_path / "a", "i.json", text)
    assert len(records["i-plural"]["image_info"]) == 2
    assert [(r["key"], r["reason"]) for r in rejects] == [("i-both", "bad_image_field")]
    assert records["i-sys"]["text_list"] == ["Be brief.", "User:", "hi"]
    assert records["i-sys"]["text_roles"] == ["system", "user", "user"]
    _, records, _ = convert_file(tmp_path / "b", "i.json", text, "--system-template", "S: {value}")
    assert records["i-sys"]["text_list"] == ["S: Be brief.", "User:", "hi"]
    _, records, rejects = convert_file(
        tmp_path / "c", "i.json", text, "--system-template", "reject"
    )
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("i-both", "bad_image_field"),
        ("i-sys", "unknown_role"),
    ]


def test_an_image_file_over_the_byte_cap_is_a_reject_read_no_further(tmp_path: Path) -> None:
    """--max-image-bytes: with the cap at b.png's size, b.png is kept and a.jpg is refused."""
    items = [
        {"id": "big", "image": "a.jpg", "conversations": [turn(H, "<image>")]},
        {"id": "ok", "image": "b.png", "conversations": [turn(H, "<image>")]},
    ]
    write_images(tmp_path / "probe")
    cap = (tmp_path / "probe" / "b.png").stat().st_size
    assert (tmp_path / "probe" / "a.jpg").stat().st_size > cap
    text = json.dumps(items)
    stats, records, rejects = convert_file(tmp_path, "s.json", text, "--max-image-bytes", str(cap))
    assert list(records) == ["s-ok"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("s-big", "image_too_many_bytes")]


def test_gpt_form_refuses_text_that_joins_with_a_placeholder(tmp_path: Path) -> None:
    """``b_!_IMAGE1<image>`` becomes ``b_!_IMAGE1_!_IMAGE2_!_``: placeholder 1 twice, 2 never."""
    items = [
        {
            "id": "join",
            "image": ["a.jpg", "b.png"],
            "conversations": [turn(H, "a <image> b_!_IMAGE1<image> c")],
        },
        {"id": "ok", "image": "a.jpg", "conversations": [turn(H, "x_!_IMAGE<image>")]},
    ]
    _, records, rejects = convert_file(tmp_path, "j.json", json.dumps(items), "--as", "gpt")
    assert list(records) == ["j-ok"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("j-join", "placeholder_in_text")]


def test_a_tag_formed_by_template_and_text_is_refused(tmp_path: Path) -> None:
    """Template ``User: <{value}`` + text ``image> hi`` would put a bare ``<image>`` in the text."""
    items = [{"id": "t", "image": "a.jpg", "conversations": [turn(H, "image> hi")]}]
    template = ["--template", "User: <{value}", "Assistant: {value}"]
    _, records, rejects = convert_file(tmp_path, "t.json", json.dumps(items), *template, code=1)
    assert records == {}
    assert [r["reason"] for r in rejects] == ["special_token_in_text"]


@pytest.mark.parametrize(
    "command",
    [
        [
            "convert",
            "conversations",
            "--json",
            "x.json",
            "--images",
            "i",
            "--max-samples-per-shard",
            "0",
        ],
        ["convert", "conversations", "--json", "x.json", "--images", "i", "--processes", "0"],
        ["convert", "chatgpt", "--sequences", "x.json", "--units-processes", "0"],
        ["convert", "laion", "--parquet", "x.parquet", "--max-pixels", "-1"],
        ["convert", "laion", "--parquet", "x.parquet", "--threads", "0"],
    ],
)
def test_counts_and_sizes_below_one_are_exit_2(command: list[str], tmp_path: Path, capsys) -> None:
    """0 or -1 samples per shard silently wrote one sample per shard; a negative pixel cap
    rejected every image."""
    with pytest.raises(SystemExit) as exc:
        cli([*command, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("named", ["val.json", "val*.json", "empty-folder"])
def test_a_named_input_that_names_no_file_is_exit_2(
    named: str, data: Path, tmp_path: Path, capsys
) -> None:
    """``--json train.json val.json`` with val.json mistyped converted train.json alone and
    exited 0: a split was lost without a word (a glob or empty folder beside others, the same)."""
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/only.json").write_text(json.dumps(ITEMS[:1]))  # a folder of .json only
    specs = [str(data / "data.json"), str(tmp_path / "folder"), str(tmp_path / named)]
    args = ["--json", *specs, "--images", str(data / "images"), "--out", str(tmp_path / "out")]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / named) in err[0]
    assert not list((tmp_path / "out").glob("*"))


def test_a_pretty_printed_single_object_is_one_item(data: Path, tmp_path: Path) -> None:
    """Not one bad_json per line of it: the object converts (or is one counted reject)."""
    one = {"id": "solo", "image": "a.jpg", "conversations": [turn("human", "<image> hi")]}
    (tmp_path / "one.json").write_text(json.dumps(one, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [one]}, indent=2))
    stats = convert_conversations(
        [str(tmp_path / "one.json"), str(tmp_path / "wrapped.json")],
        ConversationOptions(images=str(data / "images")),
        RunOptions(out_dir=str(tmp_path / "out"), converter="conversations", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["counts"]["documents"] == {"in": 2, "written": 1, "rejected": 1}
    assert stats["reasons"]["documents"] == {"no_images": 1}  # the wrapper is one item
    assert list(read_records(tmp_path / "out")) == ["one-solo"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_shards(
    tmp_path: Path,
) -> None:
    """A real process group killed mid-chunking or mid-unit, five times, then --resume: the same
    shards, sizes, rejects and counts as one uninterrupted run (chunks are cut again each time)."""
    rng = random.Random(5)
    names = [f"sub/{i}.jpg" for i in range(12)]
    (tmp_path / "images/sub").mkdir(parents=True)
    for seed, name in enumerate(names):
        (tmp_path / "images" / name).write_bytes(make_image(seed, 320, 240))
    items = []
    for i in range(300):
        chosen = rng.sample(names, rng.randint(0, 3)) + (["gone.jpg"] if i % 17 == 0 else [])
        tags = "<image>\n" * len(chosen)
        items.append(
            {
                "id": f"q{i}",
                "image": chosen,
                "conversations": [turn(H, f"{tags}Q{i}"), turn(G, "A")],
            }
        )
    (tmp_path / "llava.json").write_text(json.dumps(items))

    def command(out: str) -> list[str]:
        return [
            *(sys.executable, "-m", "flamingo_data", "convert", "conversations", "--no-progress"),
            *("--json", str(tmp_path / "llava.json"), "--images", str(tmp_path / "images")),
            *("--out", str(tmp_path / out), "--chunk-size", "20", "--processes", "2"),
            *("--max-samples-per-shard", "7", "--rejects"),
        ]

    subprocess.run(command("whole"), check=True, capture_output=True)
    for attempt in range(5):
        proc = subprocess.Popen(
            command("killed") + (["--resume"] if attempt else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.5, 3.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run(command("killed") + ["--resume"], check=True, capture_output=True)

    def result(out: str) -> tuple:
        folder = tmp_path / out
        stats = json.loads((folder / "stats.json").read_text())
        sidecars = [(folder / n).read_bytes() for n in ("sizes.json", "rejects.jsonl")]
        tars = {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}
        return tars, sidecars, stats["counts"], stats["reasons"]

    assert result("killed") == result("whole")
    assert result("whole")[2]["documents"]["in"] == 300
    assert not (tmp_path / "killed/_chunks").exists()
    assert validate_shards(str(tmp_path / "killed")).ok


def test_resuming_a_run_whose_records_carry_no_roles_is_refused(tmp_path: Path, capsys) -> None:
    """An earlier run's markers recorded no turn roles and the old system-turn default (reject):
    finishing it now would mix records with and without roles, and system turns kept in some
    units and rejected in others. One line and exit 2; --overwrite converts it again."""
    system = {"from": "system", "value": "Be brief."}
    items = [
        {"id": f"i{k}", "image": "a.jpg", "conversations": [system, turn(H, "<image> hi")]}
        for k in range(4)
    ]
    write_images(tmp_path / "images")
    (tmp_path / "e.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    common = ["--json", str(tmp_path / "e.json"), "--images", str(tmp_path / "images")]
    common += ["--out", str(out), "--chunk-size", "2"]
    assert run_cli(*common) == 0
    markers = sorted((out / "_done").glob("*.json"))
    for marker in markers:  # as the earlier version wrote them
        written = json.loads(marker.read_text())
        del written["settings"]["turn_roles"], written["settings"]["system_template"]
        marker.write_text(json.dumps(written))
    markers[1].unlink()  # that unit was cut short
    capsys.readouterr()
    assert run_cli(*common, "--resume") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"flamingo-data: error: {out} holds units converted without turn roles in their records"
        " (and with a system turn rejecting its item by default): convert it again with"
        " --overwrite or into a new output folder"
    ]
    assert run_cli(*common, "--overwrite") == 0
    records = {k: json.loads(v) for k, v in read_records(out).items()}
    assert len(records) == 4
    assert all(r["text_roles"] == ["system", "user", "user"] for r in records.values())


def test_resume_with_another_system_template_is_refused(tmp_path: Path, capsys) -> None:
    """The system template decides the records' text: it is an output setting --resume checks."""
    items = [
        {"id": "s", "image": "a.jpg", "conversations": [turn("system", "x"), turn(H, "<image>")]}
    ]
    write_images(tmp_path / "images")
    (tmp_path / "s.json").write_text(json.dumps(items))
    common = ["--json", str(tmp_path / "s.json"), "--images", str(tmp_path / "images")]
    common += ["--out", str(tmp_path / "out")]
    assert run_cli(*common) == 0
    capsys.readouterr()
    assert run_cli(*common, "--resume", "--system-template", "reject") == 2
    assert 'system_template: "{value}" in the run, "reject" now' in capsys.readouterr().err
    assert run_cli(*common, "--resume") == 0
