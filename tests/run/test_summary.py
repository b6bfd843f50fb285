"""Every converter ends with the same summary: records written of those read, into how many shards,
each category's reject reasons, where the output is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flamingo_data.cli.main import main as cli
from flamingo_data.core.stats import Stats
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.run.outcome import summary
from tests.test_upstream_compat import write_img2dataset_output

FIRST = re.compile(r"^(\w+): (\d+) of (\d+) (documents|samples) written into (\d+) shards?$")
CATEGORY = re.compile(r"^  (\w+): (\d+) rejected \((\w+ \d+)(, \w+ \d+)*(, \d+ more reasons)?\)$")


def inputs(root: Path) -> dict[str, list[str]]:
    """argv for each converter on a small input with a few bad items."""
    mmc4 = write_mmc4_sample(root / "mmc4", n_shards=2, docs_per_shard=4, missing_rate=0.3)
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(6)]
    rows = [
        (u, f"cap {i}", make_image(i, 40, 30) if i % 3 else b"not an image", "jpg")
        for i, u in enumerate(urls)
    ]
    write_img2dataset_output(
        root / "i2d", rows + [("http://127.0.0.1:9/gone.jpg", "gone", None, "jpg")]
    )
    pairs = [
        {"_!_IMAGE1_!_": {"url": urls[i]}, "_!_IMAGE2_!_": {"url": urls[i + 1]}} for i in range(5)
    ]
    sequences = [{"example": "a _!_IMAGE1_!_ b _!_IMAGE2_!_", "image_map": m} for m in pairs]
    (root / "seq.json").write_text(json.dumps(sequences))
    (root / "conv").mkdir()
    (root / "conv" / "a.jpg").write_bytes(make_image(1, 40, 30))
    items = [
        {
            "id": f"c{i}",
            "image": "a.jpg" if i else "gone.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A shape."},
            ],
        }
        for i in range(4)
    ]
    (root / "conv" / "data.json").write_text(json.dumps(items))
    common = ["--no-progress", "--processes", "1", "--rejects"]
    return {
        "mmc4": ["convert", "mmc4", "--docs", mmc4["docs"], "--images", mmc4["images"], *common],
        "laion": ["convert", "laion", "--from-img2dataset", str(root / "i2d"), *common],
        "chatgpt": ["convert", "chatgpt", "--sequences", str(root / "seq.json")]
        + ["--images-from", str(root / "i2d"), *common],
        "conversations": ["convert", "conversations", "--json", str(root / "conv" / "data.json")]
        + ["--images", str(root / "conv"), *common],
    }


@pytest.mark.parametrize("converter", ["mmc4", "laion", "chatgpt", "conversations"])
def test_every_converter_ends_with_the_same_summary(
    converter: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert cli([*inputs(tmp_path)[converter], "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    stats = json.loads((out / "stats.json").read_text())
    first = FIRST.match(lines[0])
    assert first and first.group(1) == converter, lines
    records = first.group(4)
    assert int(first.group(2)) == stats["counts"][records]["written"]
    assert int(first.group(5)) == stats["counts"]["shards"]["written"]
    shown = {CATEGORY.match(line).group(1) for line in lines[1:-1]}  # every middle line matches
    rejected = {c for c, reasons in stats["reasons"].items() if c not in ("units", "shards")}
    assert shown == rejected and rejected, lines
    assert lines[-1] == f"  in {out}: the shards, sizes.json, stats.json, rejects.jsonl"


def test_the_summary_ranks_reasons_and_says_how_many_more() -> None:
    stats = Stats(converter="mmc4")
    stats.add("documents", "in", 20)
    stats.add("documents", "written", 10)
    stats.add("shards", "written", 1)
    for i, reason in enumerate(["a", "b", "c", "d", "e", "f", "g"]):
        stats.reject("documents", reason, 7 - i if reason != "g" else 1)
    lines = summary(stats, "out")
    assert lines[0] == "mmc4: 10 of 20 documents written into 1 shard"
    assert lines[1] == "  documents: 28 rejected (a 7, b 6, c 5, d 4, e 3, 2 more reasons)"
    assert lines[2] == "  in out: the shards, sizes.json, stats.json"
