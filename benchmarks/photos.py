"""An MMC4-like input made of real photographs at web sizes (scikit-image's bundled samples, offline)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from flamingo_data.demo.sample_data import make_document

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)


def load_photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def web_jpeg(photo: Image.Image, rng: np.random.Generator) -> bytes:
    """A random crop scaled so its longer side is 300-1200 px, saved as a typical web JPEG."""
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(300, 1200) / max(crop.size)
    crop = crop.resize((max(1, int(cw * scale)), max(1, int(ch * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def write_photo_mmc4(
    root: Path, n_shards: int = 4, docs_per_shard: int = 50, seed: int = 0
) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    photos = load_photos()
    (root / "docs").mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        folder = root / "images" / str(shard)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for d in range(docs_per_shard):
            doc = make_document(
                rng, f"b{shard}d{d}", int(rng.integers(3, 8)), int(rng.integers(1, 5))
            )
            for info in doc["image_info"]:
                (folder / info["image_name"]).write_bytes(
                    web_jpeg(photos[int(rng.integers(len(photos)))], rng)
                )
            lines.append(json.dumps(doc))
        with zipfile.ZipFile(root / "docs" / f"shard_{shard}.zip", "w") as zf:
            zf.writestr(f"shard_{shard}.jsonl", "\n".join(lines) + "\n")
    return str(root / "docs" / f"shard_{{0..{n_shards - 1}}}.zip"), str(root / "images")
