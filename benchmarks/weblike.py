"""An MMC4-like input that looks like web data, generated deterministically from a seed.

Built from real photographs (``photos.load_photos``), each image is drawn from the mix a web crawl
gives: baseline JPEG at quality 70-95 (most), progressive JPEG (~20%), PNG (~10%, a third of them
RGBA cut-outs), grey and CMYK JPEG (~3% each), EXIF-rotated JPEG (~3%), 300-1,200 px on the longer
side; ~2% of image files are missing and ~1% cut off mid-stream.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
from photos import load_photos, web_crop, write_mmc4
from PIL import Image

# (kind, share); the shares add up to 1
MIX = (
    ("jpeg", 0.58),
    ("progressive", 0.20),
    ("png", 0.067),
    ("png_rgba", 0.033),
    ("grey", 0.03),
    ("cmyk", 0.03),
    ("exif_rotated", 0.03),
    ("missing", 0.02),
    ("truncated", 0.01),
)


def cut_out(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """RGBA with an elliptical opaque subject on a transparent background, as product photos are."""
    w, h = image.size
    y, x = np.ogrid[:h, :w]
    inside = ((x - w / 2) / (w * rng.uniform(0.3, 0.45))) ** 2 + (
        (y - h / 2) / (h * rng.uniform(0.3, 0.45))
    ) ** 2 <= 1
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray((inside * 255).astype(np.uint8)))
    return rgba


def web_image(kind: str, photo: Image.Image, rng: np.random.Generator) -> bytes | None:
    """The file bytes of one image of ``kind`` (None: the file is missing)."""
    if kind == "missing":
        return None
    image, buf = web_crop(photo, rng), io.BytesIO()
    quality = int(rng.integers(70, 96))
    if kind in ("png", "png_rgba"):
        (cut_out(image, rng) if kind == "png_rgba" else image).save(buf, "PNG")
    elif kind == "grey":
        image.convert("L").save(buf, "JPEG", quality=quality)
    elif kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        image.save(buf, "JPEG", quality=quality, progressive=kind == "progressive")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3] if kind == "truncated" else data


def write_web_mmc4(
    root: Path, n_shards: int = 4, docs_per_shard: int = 50, seed: int = 0
) -> tuple[str, str, Counter]:
    """MMC4 zips and their image folders (indexed layout) under ``root``; returns the docs
    pattern, the images folder and how many images of each kind were generated."""
    rng = np.random.default_rng(seed)
    photos = load_photos()
    kinds, shares = zip(*MIX, strict=True)
    made: Counter = Counter()

    def image() -> bytes | None:
        kind = str(rng.choice(kinds, p=shares))
        made[kind] += 1
        return web_image(kind, photos[int(rng.integers(len(photos)))], rng)

    docs, images = write_mmc4(root, n_shards, docs_per_shard, rng, "w", 5, image)
    return docs, images, made
