"""What each ``--resize-filter`` costs and gives, on the converter's real resize path.

For web-size photographs (the MMC4 benchmark's generator) resized to ``--short-side 256``: time per
image through ``process_image``, output bytes, and PSNR against a reference made the slow way (full
decode, Lanczos resize, no re-encode). One run, one process.
Usage: python benchmarks/bench_resize_filters.py [--images 300]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import load_photos, web_jpeg  # noqa: E402

from flamingo_data.images.stage import RESIZE_FILTERS, ImagePolicy, process_image  # noqa: E402

SHORT_SIDE = 256


def reference(data: bytes, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def psnr(data: bytes, ref: np.ndarray) -> float:
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255.0**2 / np.mean((out - ref) ** 2)))


def measure(
    images: list[bytes], refs: list[np.ndarray], policy: ImagePolicy
) -> tuple[float, float, float]:
    """(ms per image, mean bytes, mean PSNR dB)."""
    start = time.perf_counter()
    results = [process_image(data, policy) for data in images]
    ms = (time.perf_counter() - start) / len(images) * 1e3
    assert all(r.outcome == "resized" for r in results)
    sizes = [len(r.data) for r in results]
    return (
        ms,
        float(np.mean(sizes)),
        float(np.mean([psnr(r.data, ref) for r, ref in zip(results, refs, strict=True)])),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    photos = load_photos()
    images = []
    while len(images) < args.images:
        data = web_jpeg(photos[int(rng.integers(len(photos)))], rng)
        if min(Image.open(io.BytesIO(data)).size) > SHORT_SIDE:
            images.append(data)
    sizes = [process_image(d, ImagePolicy(short_side=SHORT_SIDE)) for d in images]
    refs = [reference(d, (r.width, r.height)) for d, r in zip(images, sizes, strict=True)]
    print(
        f"{len(images)} web-size photos -> short side {SHORT_SIDE}; PSNR vs full decode + Lanczos"
    )
    print(f"{'filter':<9} {'quality':>7} {'ms/image':>9} {'bytes':>8} {'PSNR dB':>8}")
    results = {}
    for quality in (90, 75):
        for name in RESIZE_FILTERS:
            policy = ImagePolicy(short_side=SHORT_SIDE, quality=quality, resize_filter=name)
            measure(images[:20], refs[:20], policy)  # warm-up
            ms, size, db = measure(images, refs, policy)
            print(f"{name:<9} {quality:>7} {ms:9.2f} {size:8.0f} {db:8.2f}")
            results[f"{name} q{quality}"] = {"ms_per_image": ms, "bytes": size, "psnr_db": db}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
