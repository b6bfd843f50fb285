"""Our shards stay readable by open_flamingo's loader (``open_flamingo/train/data.py``).

Its steps, re-stated here (not imported: open_flamingo needs torchvision and open_clip):

- interleaved: ``json.loads`` the ``.json`` member; a record holding an ``is_gpt`` key (any value)
  is a GPT sequence. MMC4 form: each ``image_info`` entry with ``image_base64`` is base64-decoded,
  skipped when ``len(bytes) // 1000 <= 10`` (under 11,000 bytes), else opened with PIL; the rows of
  ``similarity_matrix`` for those images go through a one-to-one assignment, and pairs under the
  similarity threshold are dropped. No image left: ``ValueError("No images in sample")``.
- GPT form: ``image_map["_!_IMAGEk_!_"]["base64_image"]`` for k = 1..len(image_map), each opened
  with PIL; every ``_!_IMAGE<digits>_!_`` in ``example`` becomes an ``<image>``.
- pairs: samples without ``txt`` or without a ``jpg``/``png``/``jpeg`` member are skipped, images
  decoded to RGB by PIL, captions ``.strip()``-ed.

Upstream wraps each step in a handler that logs and skips any exception, so "crashes" here are
collected as drops: every test says which documents upstream must keep, and our loader's own plan
(with upstream's 11,000-byte rule) must agree with it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image
from scipy.optimize import linear_sum_assignment

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.laion import LaionOptions, convert_laion
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.run import run_demo
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.images.stage import ImagePolicy
from flamingo_data.loader.config import LoaderConfig
from flamingo_data.loader.interleaved import plan_interleaved
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions

THRESHOLD = 0.24  # the published recipe's --mmc4_textsim_threshold
UPSTREAM_MIN_BYTES = 11_000  # upstream skips an image when len(bytes) // 1000 <= 10
AS_UPSTREAM = LoaderConfig(min_image_bytes=UPSTREAM_MIN_BYTES, sim_threshold=THRESHOLD)
GPT_PLACEHOLDER = re.compile(r"_!_IMAGE\d+_!_")


def open_flamingo_mmc4(info: dict[str, Any]) -> set[tuple[int, int]]:
    """(image index, sentence index) pairs upstream trains on; raises where upstream raises."""
    valid = []
    for i, image_info in enumerate(info["image_info"]):
        if "image_base64" not in image_info:
            continue
        data = base64.b64decode(image_info["image_base64"])
        if len(data) // 1000 <= 10:
            continue
        Image.open(io.BytesIO(data)).convert("RGB")
        valid.append(i)
    if not valid:
        raise ValueError("No images in sample")
    sim = np.array(info["similarity_matrix"])[valid]
    rows, cols = linear_sum_assignment(-sim)
    placed = {
        (valid[r], int(c)) for r, c in zip(rows, cols, strict=True) if not sim[r][c] < THRESHOLD
    }
    if not placed:
        raise ValueError("No images in sample")
    return placed


def open_flamingo_gpt(info: dict[str, Any]) -> int:
    """How many images upstream binds; they must match the ``<image>`` tokens it makes."""
    images = []
    for k in range(1, len(info["image_map"]) + 1):
        data = base64.b64decode(info["image_map"][f"_!_IMAGE{k}_!_"]["base64_image"])
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    assert images, "upstream's torch.cat fails on a sequence without images"
    assert len(GPT_PLACEHOLDER.findall(info["example"])) == len(images)
    return len(images)


def read_like_open_flamingo(shards: list[str]) -> tuple[dict[str, Any], Counter]:
    """Per key what upstream reads; plus the drops its log-and-continue handler would log."""
    read, drops = {}, Counter()
    for key, raw in wds.WebDataset(shards, shardshuffle=False).to_tuple("__key__", "json"):
        try:
            info = json.loads(raw)
            read[key] = open_flamingo_gpt(info) if "is_gpt" in info else open_flamingo_mmc4(info)
        except Exception as exc:  # upstream: handler=log_and_continue
            drops[f"{type(exc).__name__}: {exc}"] += 1
    return read, drops


def read_pairs_like_open_flamingo(shards: list[str]) -> dict[str, str]:
    """Key -> the caption upstream trains on, for every pair its LAION pipeline keeps."""

    def has_caption_and_image(sample: dict) -> bool:
        return "txt" in sample and ("png" in sample or "jpg" in sample or "jpeg" in sample)

    dataset = wds.WebDataset(shards, shardshuffle=False).select(has_caption_and_image)
    dataset = dataset.decode("pilrgb").to_tuple("__key__", "jpg;png;jpeg", "txt")
    return {key: caption.strip() for key, _image, caption in dataset}


def our_plan(info: dict[str, Any]) -> set[tuple[int, int]] | None:
    """What our loader places under upstream's byte rule (None: it rejects the document)."""
    plan = plan_interleaved(info, AS_UPSTREAM)
    if plan.rejected_reason:
        return None
    return {(p.image_index, p.sentence_index) for p in plan.placements}


def records(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                found[member.name.removesuffix(".json")] = json.loads(
                    tar.extractfile(member).read()
                )
    return found


def shards_of(out: Path) -> list[str]:
    return sorted(str(p) for p in out.glob("*.tar"))


def photo_like(seed: int, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """Noisy pixels: real codec bytes that stay above upstream's 11,000 bytes, as web photos do."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def assert_upstream_reads_what_we_plan(out: Path) -> dict[str, Any]:
    """Every written interleaved record: upstream keeps exactly the documents and image/sentence
    pairs our loader plans under upstream's rules, and fails on nothing else."""
    read, drops = read_like_open_flamingo(shards_of(out))
    planned = {key: our_plan(info) for key, info in records(out).items()}
    assert {k: v for k, v in planned.items() if v is not None} == read
    assert sum(drops.values()) == sum(v is None for v in planned.values())
    assert set(drops) <= {"ValueError: No images in sample"}
    return read


def convert_sample(tmp_path: Path, images: str, docs: str, **options: Any) -> Path:
    out = tmp_path / "out"
    convert_mmc4(
        docs,
        Mmc4Options(images=images, **options),
        RunOptions(out_dir=str(out), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    return out


@pytest.mark.parametrize(
    "options",
    [  # resized at 90: the --short-side default (70) puts these under upstream's 11,000 bytes
        {},
        {"policy": ImagePolicy(short_side=128, quality=90)},
        {"keep_docs_without_images": True},
    ],
    ids=["kept", "resized", "docs-without-images-kept"],
)
def test_mmc4_shards_read_by_open_flamingo_steps(tmp_path: Path, options: dict) -> None:
    """Documents with some images missing (no image_base64 key) and resized images are read; a
    document kept without any image is the only kind upstream drops (so does our loader)."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=10, missing_rate=0.3)
    for seed, path in enumerate(sorted(Path(sample["images"]).rglob("*.jpg"))):
        path.write_bytes(photo_like(seed, 200, 160))
    out = convert_sample(tmp_path, sample["images"], sample["docs"], **options)
    read = assert_upstream_reads_what_we_plan(out)
    written = json.loads((out / "stats.json").read_text())["counts"]["documents"]["written"]
    kept_without_images = sum(
        all("image_base64" not in i for i in r["image_info"]) for r in records(out).values()
    )
    assert len(read) == written - kept_without_images > 0
    assert kept_without_images > 0 if options.get("keep_docs_without_images") else True
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == written


def test_open_flamingo_skips_images_under_11000_bytes(tmp_path: Path) -> None:
    """Upstream drops every image under 11,000 bytes, and a document left with none (README):
    small or resized images cost documents there, not in our loader (min_image_bytes=0)."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=10, missing_rate=0.0)
    out = convert_sample(tmp_path, sample["images"], sample["docs"])
    written = records(out)
    assert all(
        len(base64.b64decode(i["image_base64"])) < UPSTREAM_MIN_BYTES
        for r in written.values()
        for i in r["image_info"]
    )
    read, drops = read_like_open_flamingo(shards_of(out))
    assert len(written) == 10 and read == {}
    assert drops == {"ValueError: No images in sample": 10}
    assert all(our_plan(r) is None for r in written.values())
    assert all(plan_interleaved(r, LoaderConfig()).placements for r in written.values())


def test_validate_counts_what_open_flamingo_would_skip(tmp_path: Path, capsys) -> None:
    """validate tells upstream's users what its byte rule will cost them: the images under 11,000
    bytes and the documents left with none (which upstream's own steps drop), as a note."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=12, missing_rate=0.2)
    for seed, path in enumerate(sorted(Path(sample["images"]).rglob("*.jpg"))):
        if seed % 3 == 0:  # the rest stay the sample's small JPEGs
            path.write_bytes(photo_like(seed, 200, 160))
    out = convert_sample(tmp_path, sample["images"], sample["docs"])
    sizes = [
        [len(base64.b64decode(i["image_base64"])) for i in r["image_info"] if "image_base64" in i]
        for r in records(out).values()
    ]
    small = sum(n < UPSTREAM_MIN_BYTES for doc in sizes for n in doc)
    left_without = [doc for doc in sizes if all(n < UPSTREAM_MIN_BYTES for n in doc)]
    assert 0 < len(left_without) < len(sizes) and small > len(left_without)
    for info in records(out).values():  # upstream's own steps drop exactly those documents
        kept = [i for i in info["image_info"] if "image_base64" in i]
        if all(len(base64.b64decode(i["image_base64"])) < UPSTREAM_MIN_BYTES for i in kept):
            with pytest.raises(ValueError, match="No images in sample"):
                open_flamingo_mmc4(info)
    report = validate_shards(str(out))
    assert report.ok and report.open_flamingo_skips == {
        "images": small,
        "documents": len(left_without),
    }
    assert report.to_json()["open_flamingo_skips"] == {
        "images_under_11000_bytes": small,
        "documents_left_without_images": len(left_without),
    }
    assert cli(["validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"would skip {small} interleaved images" in printed
    assert f"and {len(left_without)} documents left without one" in printed


def test_demo_shards_read_by_open_flamingo_steps(tmp_path: Path) -> None:
    """The demo's shards: upstream reads what our loader plans under its rules."""
    result = run_demo(tmp_path / "demo", train=False)
    assert result.ok
    assert assert_upstream_reads_what_we_plan(Path(result.artifacts["shards"]))


def test_an_is_gpt_key_in_a_source_document_is_refused(tmp_path: Path) -> None:
    """Upstream tests ``"is_gpt" in info``: an MMC4 document carrying ``is_gpt: false`` (or null, 0)
    went down its GPT path and failed on ``info["example"]``, though we wrote it and validate
    passed it. Now it is a ``schema`` reject, and validate flags such a record."""
    (tmp_path / "images" / "0").mkdir(parents=True)
    (tmp_path / "images" / "0" / "a.jpg").write_bytes(photo_like(0, 200, 160))
    doc = {
        "text_list": ["A flamingo.", "Water."],
        "image_info": [{"image_name": "a.jpg", "matched_text_index": 0, "matched_sim": 0.3}],
        "similarity_matrix": [[0.3, 0.1]],
    }
    lines = [json.dumps({**doc, "is_gpt": value}) for value in (False, None, 0)] + [json.dumps(doc)]
    with zipfile.ZipFile(tmp_path / "shard_0.zip", "w") as zf:
        zf.writestr("shard_0.jsonl", "\n".join(lines) + "\n")
    out = convert_sample(tmp_path, str(tmp_path / "images"), str(tmp_path / "shard_0.zip"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["documents"] == {"schema": 3}
    assert assert_upstream_reads_what_we_plan(out) == {"shard_0-0000004": {(0, 0)}}
    data = json.dumps({**records(out)["shard_0-0000004"], "is_gpt": False}).encode()
    member = tarfile.TarInfo("hand-0.json")
    member.size = len(data)
    with tarfile.open(tmp_path / "hand-00000.tar", "w") as tar:
        tar.addfile(member, io.BytesIO(data))
    assert validate_shards(str(tmp_path / "hand-00000.tar")).reasons() == {"schema": 1}


def write_img2dataset_output(folder: Path, rows: list[tuple[str, str, bytes | None, str]]) -> None:
    """One finished img2dataset shard (tar, parquet, ``_stats.json``) from (url, caption, image
    bytes or None for a failed fetch, image extension) rows: no download needed."""
    folder.mkdir(parents=True)
    table = []
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for row, (url, caption, image, ext) in enumerate(rows):
            key = f"00000{row:04d}"
            table.append((key, url, "success" if image else "failed_to_download", None))
            if image is None:
                continue
            meta = {"key": key, "url": url, "caption": caption, "status": "success"}
            for name, data in (
                (ext, image),
                ("txt", caption.encode()),
                ("json", json.dumps(meta).encode()),
            ):
                member = tarfile.TarInfo(f"{key}.{name}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    frame = pd.DataFrame(table, columns=["key", "url", "status", "error_message"])
    frame.to_parquet(folder / "00000.parquet")
    done = int((frame["status"] == "success").sum())
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(rows), "successes": done}))


def url(n: int) -> str:
    return f"http://127.0.0.1:9/{n}.jpg"  # never fetched: images come from --images-from


@pytest.mark.parametrize("missing", ["drop", "strip"])
def test_gpt_shards_from_chatgpt_read_by_open_flamingo_steps(tmp_path: Path, missing: str) -> None:
    """Every written sequence, including ones whose failed image was stripped and renumbered and
    resized ones, is read with one image per placeholder."""
    images = [photo_like(1, 200, 160), photo_like(2, 160, 120, "PNG"), photo_like(3, 300, 200)]
    rows = [(url(n), "", data, "jpg") for n, data in enumerate(images, start=1)]
    write_img2dataset_output(tmp_path / "i2d", [*rows, (url(4), "", None, "jpg")])
    image_map = {f"_!_IMAGE{k}_!_": {"url": url(n)} for k, n in enumerate((1, 4, 2, 3), start=1)}
    sequences = [
        {
            "example": "A _!_IMAGE1_!_ cat and _!_IMAGE2_!_ a dog.",
            "image_map": {"_!_IMAGE1_!_": {"url": url(1)}, "_!_IMAGE2_!_": {"url": url(2)}},
        },
        {
            "example": "_!_IMAGE1_!_ x _!_IMAGE2_!_ y _!_IMAGE3_!_ z _!_IMAGE4_!_",
            "image_map": image_map,
        },
    ]
    (tmp_path / "seq.json").write_text(json.dumps(sequences))
    stats = convert_chatgpt(
        str(tmp_path / "seq.json"),
        ChatGptOptions(
            missing=missing, images_from=str(tmp_path / "i2d"), policy=ImagePolicy(max_side=128)
        ),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    read, drops = read_like_open_flamingo(shards_of(tmp_path / "out"))
    assert not drops and stats["counts"]["documents"]["written"] == len(read)
    assert read == ({"seq-0000000": 2} | ({"seq-0000001": 3} if missing == "strip" else {}))


CONVERSATIONS = [
    {
        "id": "start",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A bird."},
        ],
    },
    {
        "id": "end",
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "Look"},
            {"from": "gpt", "value": "at this <image>"},
        ],
    },
    {
        "id": "adjacent",
        "image": ["a.jpg", "b.png"],
        "conversations": [
            {"from": "human", "value": "Two <image><image> here."},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {
        "id": "llava-adjacent",
        "image": ["a.jpg", "b.png", "c.jpg"],
        "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "<image>\n<image>\nCompare these."},
            {"from": "gpt", "value": "The second is darker <image>"},
        ],
    },
    {
        "id": "notag",
        "image": ["a.jpg", "b.png", "c.jpg"],
        "conversations": [
            {"from": "human", "value": "Describe."},
            {"from": "gpt", "value": "Three birds."},
        ],
    },
]


@pytest.mark.parametrize("as_", ["interleaved", "gpt"])
def test_conversation_shards_read_by_open_flamingo_steps(tmp_path: Path, as_: str) -> None:
    """Both forms: every item is read; interleaved ones place each image at its own sentence, none
    of them empty (an image followed by no text owns a newline), and carry their turns' roles."""
    (tmp_path / "images").mkdir()
    for seed, name in enumerate(("a.jpg", "b.png", "c.jpg")):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (tmp_path / "images" / name).write_bytes(photo_like(seed, 200, 160, fmt))
    (tmp_path / "data.json").write_text(json.dumps(CONVERSATIONS))
    convert_conversations(
        str(tmp_path / "data.json"),
        ConversationOptions(images=str(tmp_path / "images"), as_=as_),
        RunOptions(out_dir=str(tmp_path / "out"), converter="conversations"),
        execution=Execution(processes=1, progress=False),
    )
    if as_ == "interleaved":
        read = assert_upstream_reads_what_we_plan(tmp_path / "out")
        assert read["data-adjacent"] == {(0, 1), (1, 2)}
        assert read["data-llava-adjacent"] == {(0, 2), (1, 3), (2, 5)}
        written = records(tmp_path / "out")
        assert written["data-llava-adjacent"]["text_list"] == [
            "Answer briefly.",
            "User:",
            "\n",
            "Compare these.",
            "Assistant: The second is darker",
            "\n",
        ]
        assert written["data-llava-adjacent"]["text_roles"] == [
            "system",
            "user",
            "user",
            "user",
            "assistant",
            "assistant",
        ]
        assert all(s.strip() or s == "\n" for r in written.values() for s in r["text_list"])
    else:
        read, drops = read_like_open_flamingo(shards_of(tmp_path / "out"))
        assert not drops
        record = records(tmp_path / "out")["data-llava-adjacent"]
        turns = [(role, record["example"][start:end]) for role, start, end in record["role_spans"]]
        assert turns == [
            ("system", "Answer briefly."),
            ("user", "User: _!_IMAGE1_!_\n_!_IMAGE2_!_\nCompare these."),
            ("assistant", "Assistant: The second is darker _!_IMAGE3_!_"),
        ]
    assert {k: len(v) if isinstance(v, set) else v for k, v in read.items()} == {
        "data-start": 1,
        "data-end": 1,
        "data-adjacent": 2,
        "data-llava-adjacent": 3,
        "data-notag": 3,
    }


def test_pair_shards_read_by_open_flamingo_steps(tmp_path: Path) -> None:
    """Adopted img2dataset pairs: JPEG and PNG samples are read with their (stripped) captions;
    a .webp sample passes our checks but upstream's LAION path skips it (README says so)."""
    rows = [
        (url(1), "A pink bird.", photo_like(1, 120, 90), "jpg"),
        (url(2), "  padded caption \n", photo_like(2, 90, 120, "PNG"), "png"),
        (url(3), "odd: ü 🦩 \t<b>", photo_like(3, 64, 64), "jpg"),
        (url(4), "a webp picture", photo_like(4, 64, 64, "WEBP"), "webp"),
        (url(5), "dead link", None, "jpg"),
    ]
    write_img2dataset_output(tmp_path / "i2d", rows)
    stats = convert_laion(
        None,
        LaionOptions(),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
        from_img2dataset=str(tmp_path / "i2d"),
    ).to_json()
    assert stats["counts"]["samples"] == {"in": 4, "written": 4}
    assert validate_shards(str(tmp_path / "out"), deep=True).ok
    assert read_pairs_like_open_flamingo(shards_of(tmp_path / "out")) == {
        "000000000": "A pink bird.",
        "000000001": "padded caption",
        "000000002": "odd: ü 🦩 \t<b>",
    }
