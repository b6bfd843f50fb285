"""Our shards stay readable by open_flamingo's loader.

open_flamingo reads ``wds.WebDataset(...).to_tuple("json")``, ``json.loads`` the member, and for MMC4 documents
base64-decodes ``image_base64`` of each image, opens it with PIL and runs a one-to-one assignment on the
rows of ``similarity_matrix`` for those images; for GPT records it decodes ``image_map["_!_IMAGEk_!_"]`` for
k = 1..n. These tests walk our converters' output through those same steps (re-stated here, not imported:
open_flamingo needs torchvision and open_clip) and require every sample to pass.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy.optimize import linear_sum_assignment

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.images import ImagePolicy
from flamingo_data.samples import write_mmc4_sample
from flamingo_data.units import RunOptions


def read_like_open_flamingo(shards: list[str]) -> list[dict]:
    """The upstream reading steps; raises on anything upstream would trip on."""
    records = []
    for (raw,) in wds.WebDataset(shards, shardshuffle=False).to_tuple("json"):
        info = json.loads(raw)
        if "is_gpt" in info:
            _check_gpt(info)
        else:
            _check_mmc4(info)
        records.append(info)
    return records


def _check_mmc4(info: dict) -> None:
    valid = []
    for i, image_info in enumerate(info["image_info"]):
        if "image_base64" not in image_info:
            continue
        Image.open(io.BytesIO(base64.b64decode(image_info["image_base64"]))).convert("RGB")
        valid.append(i)
    assert valid, "upstream raises 'No images in sample'"
    sim = np.array(info["similarity_matrix"])[valid]
    rows, cols = linear_sum_assignment(-sim)
    assert all(0 <= c < len(info["text_list"]) for c in cols)
    assert len(rows) == min(len(valid), len(info["text_list"]))


def _check_gpt(info: dict) -> None:
    numbers = sorted(int(n) for n in re.findall(r"_!_IMAGE(\d+)_!_", info["example"]))
    assert numbers == list(range(1, len(info["image_map"]) + 1))
    for k in range(1, len(info["image_map"]) + 1):
        data = base64.b64decode(info["image_map"][f"_!_IMAGE{k}_!_"]["base64_image"])
        Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize(
    "policy", [ImagePolicy(), ImagePolicy(short_side=48)], ids=["kept", "resized"]
)
def test_mmc4_shards_read_by_open_flamingo_steps(tmp_path: Path, policy: ImagePolicy) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=10)
    run = RunOptions(out_dir=str(tmp_path / "out"), converter="mmc4")
    stats = convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"], policy=policy),
        run,
        processes=1,
        progress=False,
    )
    shards = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    records = read_like_open_flamingo(shards)
    assert len(records) == stats.get("documents", "written") > 0
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(records)
