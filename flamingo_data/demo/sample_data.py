"""Generated sample data (real JPEG/PNG bytes, MMC4-shaped documents) for the demo, tests and benchmarks.

Nothing here touches the network: images are drawn from a seeded random generator.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_WORDS = [
    "the",
    "a",
    "flamingo",
    "stands",
    "in",
    "shallow",
    "water",
    "near",
    "pink",
    "birds",
    "lake",
    "sunset",
    "feathers",
    "long",
    "legs",
    "colony",
    "nest",
    "beak",
    "salt",
    "flat",
    "flock",
    "wading",
    "island",
    "bright",
    "sky",
    "reflection",
    "morning",
    "calm",
]


def make_image(
    seed: int, width: int = 96, height: int = 72, fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A small, seeded, non-uniform picture encoded as ``fmt`` (real codec bytes)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, size=3)
    arr = np.stack([(base[c] + x * (c + 1) + y * (3 - c)) % 256 for c in range(3)], axis=-1).astype(
        np.uint8
    )
    image = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse(
            (x0, y0, x0 + width // 4, y0 + height // 4),
            fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
        )
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_sentence(rng: np.random.Generator, n_words: int = 8) -> str:
    words = rng.choice(_WORDS, size=n_words)
    return " ".join(words).capitalize() + "."


def make_document(
    rng: np.random.Generator, doc_id: str, n_sentences: int, n_images: int
) -> dict[str, Any]:
    """An MMC4 document (no image bytes) with a consistent images x sentences similarity matrix."""
    text_list = [make_sentence(rng, int(rng.integers(5, 14))) for _ in range(n_sentences)]
    sim = rng.uniform(0.1, 0.2, size=(n_images, n_sentences))
    image_info = []
    for i in range(n_images):
        match = int(rng.integers(0, n_sentences))
        sim[i, match] = float(rng.uniform(0.25, 0.35))
        image_info.append(
            {
                "image_name": f"{doc_id}{i:02d}.jpg",
                "raw_url": f"http://example.invalid/{doc_id}/{i}.jpg",
                "matched_text_index": match,
                "matched_sim": round(float(sim[i, match]), 6),
                "face_detections": None,
            }
        )
    return {
        "url": f"http://example.invalid/{doc_id}",
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": np.round(sim, 6).tolist(),
        "could_have_url_duplicate": 0,
    }


def write_mmc4_sample(
    root: str | Path,
    n_shards: int = 2,
    docs_per_shard: int = 8,
    missing_rate: float = 0.1,
    layout: str = "indexed",
    seed: int = 0,
    image_size: tuple[int, int] = (96, 72),
) -> dict[str, Any]:
    """Write ``docs/shard_{i}.zip`` and downloaded images in ``layout`` (indexed | flat).

    Returns the docs pattern, images folder and the documents written, for checking round trips.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    images_dir = root / "images"
    documents: list[list[dict[str, Any]]] = []
    for shard in range(n_shards):
        docs = [
            make_document(rng, f"s{shard}d{d}", int(rng.integers(2, 7)), int(rng.integers(1, 4)))
            for d in range(docs_per_shard)
        ]
        for doc in docs:
            for info in doc["image_info"]:
                if rng.uniform() < missing_rate:
                    continue
                folder = (
                    images_dir / str(shard)
                    if layout == "indexed"
                    else images_dir / f"shard_{shard}_images"
                )
                folder.mkdir(parents=True, exist_ok=True)
                seed_i = int(rng.integers(0, 2**31))
                (folder / info["image_name"]).write_bytes(make_image(seed_i, *image_size))
        lines = "".join(json.dumps(doc) + "\n" for doc in docs)
        with zipfile.ZipFile(root / "docs" / f"shard_{shard}.zip", "w") as zf:
            zf.writestr(f"shard_{shard}.jsonl", lines)
        documents.append(docs)
    return {
        "docs": str(root / "docs" / f"shard_{{0..{n_shards - 1}}}.zip"),
        "images": str(images_dir),
        "documents": documents,
    }
