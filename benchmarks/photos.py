"""An MMC4-like input made of real photographs at web sizes (scikit-image's bundled samples, offline)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
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


def web_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop scaled so its longer side is 300-1,200 px."""
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = photo.crop((left, top, left + cw, top + ch))
    scale = rng.uniform(300, 1200) / max(crop.size)
    return crop.resize((max(1, int(cw * scale)), max(1, int(ch * scale))), Image.Resampling.BICUBIC)


def web_jpeg(photo: Image.Image, rng: np.random.Generator) -> bytes:
    """A web crop saved as a typical web JPEG."""
    buf = io.BytesIO()
    web_crop(photo, rng).save(buf, "JPEG", quality=88)
    return buf.getvalue()


def write_mmc4(
    root: Path,
    n_shards: int,
    docs_per_shard: int,
    rng: np.random.Generator,
    doc_prefix: str,
    max_images: int,
    image_bytes: Callable[[], bytes | None],
) -> tuple[str, str]:
    """MMC4 zips under ``root/docs`` and their images in ``root/images/<shard>/`` (indexed
    layout), each image file from ``image_bytes()`` (None: left missing); returns the docs
    pattern and the images folder."""
    (root / "docs").mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        folder = root / "images" / str(shard)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for d in range(docs_per_shard):
            n_sentences = int(rng.integers(3, 8))
            n_images = int(rng.integers(1, max_images + 1))
            doc = make_document(rng, f"{doc_prefix}{shard}d{d}", n_sentences, n_images)
            for info in doc["image_info"]:
                if (data := image_bytes()) is not None:
                    (folder / info["image_name"]).write_bytes(data)
            lines.append(json.dumps(doc))
        with zipfile.ZipFile(root / "docs" / f"shard_{shard}.zip", "w") as zf:
            zf.writestr(f"shard_{shard}.jsonl", "\n".join(lines) + "\n")
    return str(root / "docs" / f"shard_{{0..{n_shards - 1}}}.zip"), str(root / "images")


def write_photo_mmc4(
    root: Path, n_shards: int = 4, docs_per_shard: int = 50, seed: int = 0
) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    photos = load_photos()

    def photo() -> bytes:
        return web_jpeg(photos[int(rng.integers(len(photos)))], rng)

    return write_mmc4(root, n_shards, docs_per_shard, rng, "b", 4, photo)
