"""The workflow people prepare Flamingo data for, end to end on the CPU: LLaVA-style JSON with
images -> ``convert conversations`` -> ``validate`` -> ``train --init-from openflamingo:`` (a
checkpoint written by open_flamingo's own model) with ``--fsdp`` on 2 processes -> ``--resume``
-> ``export-openflamingo`` -> open_flamingo's model loads it and gives our logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flamingo_data.cli.main import main as cli
from flamingo_data.demo.sample_data import make_image
from flamingo_data.loader import make_tokenizer
from flamingo_data.train.export import load_run_model
from tests.openflamingo_parts import batch
from tests.train.test_openflamingo_run import EVERY, assets, open_flamingo  # noqa: F401


def llava_dataset(root: Path) -> Path:
    """Eight multi-turn conversations over real JPEG/PNG files, one or two images each."""
    images = root / "images"
    images.mkdir(parents=True)
    for n in range(4):
        (images / f"p{n}.jpg").write_bytes(make_image(n, 96, 80))
    items = []
    for n in range(8):
        two = n % 2 == 1
        first = (
            "<image>\nWhat is in this picture?" if not two else "<image> and <image>: compare them."
        )
        items.append(
            {
                "id": f"item-{n}",
                "image": [f"p{n % 4}.jpg", f"p{(n + 1) % 4}.jpg"] if two else f"p{n % 4}.jpg",
                "conversations": [
                    {"from": "human", "value": first},
                    {"from": "gpt", "value": f"A flamingo standing in water, number {n}."},
                    {"from": "human", "value": "What colour is it?"},
                    {"from": "gpt", "value": "Pink."},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(items))
    return root


def torchrun(models: Path, shards: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--master-addr", "127.0.0.1", "-m", "flamingo_data.train",
        "--mmc4-shards", str(shards), "--run-dir", str(run_dir), "--fsdp",
        "--batch-size", "2", "--max-tokens", "64", "--seed", "1",
        "--vision", f"hf:{models / 'clip'}", "--lm", f"hf:{models / 'lm'}",
        "--tokenizer", str(models / "tok"), "--cross-attn-every-n-layers", str(EVERY),
        "--init-from", f"openflamingo:{models / 'init.pt'}", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_llava_json_to_an_openflamingo_checkpoint_through_fsdp_training(
    assets: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = llava_dataset(tmp_path / "llava")
    shards = tmp_path / "shards"
    convert = ["convert", "conversations", "--json", str(data / "data.json")]
    assert cli([*convert, "--images", str(data / "images"), "--out", str(shards)]) == 0
    assert cli(["validate", str(shards), "--deep"]) == 0

    run_dir = tmp_path / "run"
    first = torchrun(assets, shards, run_dir, "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
    resumed = torchrun(assets, shards, run_dir, "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "log.jsonl").read_text().splitlines()
        if '"step"' in line
    ]
    assert steps[-1] == 3

    out = tmp_path / "checkpoint.pt"
    assert cli(["export-openflamingo", str(run_dir), "--out", str(out)]) == 0
    tokenizer = make_tokenizer(str(assets / "tok"))
    theirs = open_flamingo(assets, tokenizer)
    exported = torch.load(out)
    assert theirs.load_state_dict(exported, strict=False).unexpected_keys == []
    started = torch.load(assets / "init.pt")
    moved = (exported["perceiver.latents"] - started["perceiver.latents"]).abs().max()
    assert 0 < moved < 0.01  # trained from the checkpoint's weights, 3 small steps away
    ours, step = load_run_model(run_dir / "checkpoints" / "step_0000003")
    assert step == 3
    data_batch = batch(tokenizer=tokenizer)
    with torch.no_grad():
        mine = ours.eval()(**data_batch)
        other = theirs(
            data_batch["vision_x"],
            data_batch["lang_x"],
            data_batch["attention_mask"],
            data_batch["labels"],
        )
    assert (mine.logits - other.logits).abs().max() <= 1e-5
