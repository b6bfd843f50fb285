"""``flamingo-data demo``: the whole path on a bundled sample, offline, in about a minute on a laptop CPU.

Builds an MMC4-shaped sample from the photos in ``flamingo_data/assets``, converts it, validates the
shards, writes an inspect report and an HTML preview, and trains a tiny Flamingo for a few steps.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flamingo_data.core.extras import require_extra
from flamingo_data.demo.sample_data import make_document
from flamingo_data.run.executors import Execution

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
CAPTIONS = {
    "astronaut": "An astronaut in an orange suit poses in front of the flag.",
    "coffee": "A cup of coffee sits on a saucer with a spoon.",
    "chelsea": "A tabby cat looks straight at the camera.",
    "rocket": "A rocket lifts off from the launch pad on a column of smoke.",
    "hubble_deep_field": "Thousands of distant galaxies fill the deep field image.",
}


@dataclass
class DemoResult:
    """Where each artifact of the demo landed, and the headline numbers."""

    root: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.numbers.get("validate") == "OK"


def bundled_photo(name: str) -> Image.Image:
    data = resources.files("flamingo_data").joinpath("assets", f"{name}.jpg").read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def photo_variant(name: str, rng: np.random.Generator) -> bytes:
    """A random crop of a bundled photo, saved as JPEG: same subject, different bytes."""
    image = bundled_photo(name)
    width, height = image.size
    crop_w, crop_h = int(width * rng.uniform(0.7, 1.0)), int(height * rng.uniform(0.7, 1.0))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    buf = io.BytesIO()
    image.crop((left, top, left + crop_w, top + crop_h)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def write_photo_sample(
    root: Path, n_shards: int = 2, docs_per_shard: int = 12, seed: int = 0
) -> tuple[str, str]:
    """MMC4 zips + an indexed image folder whose images are the bundled photos, captions matched."""
    rng = np.random.default_rng(seed)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        lines = []
        for d in range(docs_per_shard):
            lines.append(
                json.dumps(_photo_document(root / "images" / str(shard), f"s{shard}d{d}", rng))
            )
        with zipfile.ZipFile(root / "docs" / f"shard_{shard}.zip", "w") as zf:
            zf.writestr(f"shard_{shard}.jsonl", "\n".join(lines) + "\n")
    return str(root / "docs" / f"shard_{{0..{n_shards - 1}}}.zip"), str(root / "images")


def _photo_document(folder: Path, doc_id: str, rng: np.random.Generator) -> dict[str, Any]:
    n_images = int(rng.integers(1, 4))
    doc = make_document(rng, doc_id, n_sentences=int(rng.integers(3, 6)), n_images=n_images)
    folder.mkdir(parents=True, exist_ok=True)
    for info in doc["image_info"]:
        photo = PHOTOS[int(rng.integers(0, len(PHOTOS)))]
        doc["text_list"][info["matched_text_index"]] = CAPTIONS[photo]
        (folder / info["image_name"]).write_bytes(photo_variant(photo, rng))
    return doc


def run_demo(out: str | Path, steps: int = 12, seed: int = 0, train: bool = True) -> DemoResult:
    """Every step of the product on the bundled sample; each artifact's path goes into the result.
    ``train`` needs the [train] extra: without it MissingExtra is raised before anything is written."""
    if train:
        require_extra("train", "run_demo(train=True)")
    from flamingo_data.check.validate import validate_shards
    from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
    from flamingo_data.run.units import RunOptions

    root = Path(out)
    result = DemoResult(root=root)
    docs, images = write_photo_sample(root / "source", seed=seed)
    result.artifacts["source"] = str(root / "source")
    shards = root / "shards"
    stats = convert_mmc4(
        docs,
        Mmc4Options(images=images),
        RunOptions(out_dir=str(shards), converter="mmc4"),
        overwrite=True,
        execution=Execution(processes=1, progress=False),
    )
    result.artifacts.update(
        shards=str(shards), stats=str(shards / "stats.json"), sizes=str(shards / "sizes.json")
    )
    result.numbers["documents written"] = stats.get("documents", "written")
    report = validate_shards(str(shards))
    result.numbers["validate"] = "OK" if report.ok else f"FAILED {dict(report.reasons())}"
    _demo_views(shards, root, result)
    if train:
        _demo_train(shards, root, steps, seed, result)
    return result


def _demo_views(shards: Path, root: Path, result: DemoResult) -> None:
    """inspect + preview (the core install has both)."""
    from flamingo_data.check.inspect import inspect_shards
    from flamingo_data.check.preview import write_preview

    report = inspect_shards(str(shards))
    (root / "inspect.json").write_text(json.dumps(report.to_json(), indent=1))
    result.artifacts["inspect"] = str(root / "inspect.json")
    write_preview(str(shards), str(root / "preview.html"), n=8)
    result.artifacts["preview"] = str(root / "preview.html")


def _demo_train(shards: Path, root: Path, steps: int, seed: int, result: DemoResult) -> None:
    from flamingo_data.train.trainer import main as train_main

    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run, remade like its shards
    argv = [
        "--mmc4-shards",
        str(shards),
        "--run-dir",
        str(run_dir),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--max-tokens",
        "160",
        "--checkpoint-every",
        str(steps),
    ]
    summary = train_main(argv)
    result.artifacts["training run"] = str(run_dir)
    for name in ("steps", "fixed_batch_loss_start", "fixed_batch_loss_end"):
        if name in summary:
            result.numbers[f"train {name}"] = (
                round(summary[name], 4) if isinstance(summary[name], float) else summary[name]
            )
