"""Why the image stage decodes at 1/2, 1/4, 1/8 scale only and resizes the rest with OpenCV.

Part 1: libjpeg-turbo (simplejpeg) decode time at every M/8 scale, for a web-size and a small JPEG.
Part 2: for web-size photos resized to short side 256 after the DCT-scaled decode the image stage
uses, the time and PSNR (before any JPEG encode, against a full decode + PIL Lanczos) of PIL's
antialiased resize and OpenCV's kernels. One process, one run.
Usage: python benchmarks/bench_decode_scales.py [--images 200]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import load_photos, web_jpeg  # noqa: E402

from flamingo_data.images.stage import dct_scale_limit  # noqa: E402

SHORT_SIDE = 256


def jpeg(photo: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    buf = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def ms_per_call(fn: Callable[[], object], repeats: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def decode_scales(photo: Image.Image) -> dict[str, dict[str, float]]:
    print("part 1: decode ms at each DCT scale M/8 (8/8 = full size)")
    results = {}
    for size, quality in (((1000, 667), 88), ((384, 256), 90)):
        data = jpeg(photo, size, quality)
        row = []
        for m in range(1, 9):
            limit = {"min_width": -(-size[0] * m // 8)}
            row.append(ms_per_call(lambda d=data, k=limit: simplejpeg.decode_jpeg(d, **k)))
        print(
            f"  {size[0]}x{size[1]}: " + "  ".join(f"{m}/8 {t:.2f}" for m, t in enumerate(row, 1))
        )
        results[f"{size[0]}x{size[1]}"] = {f"{m}/8": t for m, t in enumerate(row, 1)}
    return results


def target_of(width: int, height: int) -> tuple[int, int]:
    scale = SHORT_SIDE / min(width, height)
    return round(width * scale), round(height * scale)


def resize_kernels(images: list[bytes]) -> dict[str, dict[str, float]]:
    cases = []
    for data in images:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if min(width, height) > SHORT_SIDE:
            target = target_of(width, height)
            limit = dct_scale_limit(width, height, SHORT_SIDE)
            full = Image.open(io.BytesIO(data)).convert("RGB")
            ref = np.asarray(full.resize(target, Image.Resampling.LANCZOS), np.float64)
            cases.append((simplejpeg.decode_jpeg(data, **limit), target, ref))
    factors = [pixels.shape[1] / target[0] for pixels, target, _ in cases]
    print(
        f"part 2: {len(cases)} photos, resize left after the DCT-scaled decode "
        f"(factor median {np.median(factors):.2f}, max {max(factors):.2f})"
    )
    kernels = {
        "PIL bicubic (antialiased)": lambda p, t: np.asarray(
            Image.fromarray(p).resize(t, Image.Resampling.BICUBIC)
        ),
        "PIL bilinear (antialiased)": lambda p, t: np.asarray(
            Image.fromarray(p).resize(t, Image.Resampling.BILINEAR)
        ),
        "OpenCV INTER_CUBIC": lambda p, t: cv2.resize(p, t, interpolation=cv2.INTER_CUBIC),
        "OpenCV INTER_LINEAR": lambda p, t: cv2.resize(p, t, interpolation=cv2.INTER_LINEAR),
    }
    results = {}
    for name, kernel in kernels.items():
        start = time.perf_counter()
        outputs = [kernel(pixels, target) for pixels, target, _ in cases]
        ms = (time.perf_counter() - start) / len(cases) * 1e3
        mse = [np.mean((out - ref) ** 2) for out, (_, _, ref) in zip(outputs, cases, strict=True)]
        db = np.mean([10 * np.log10(255.0**2 / e) for e in mse])
        print(f"  {name:<28} {ms:6.2f} ms/image  {db:6.2f} dB")
        results[name] = {"ms_per_image": ms, "psnr_db": float(db)}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    photos = load_photos()
    scales = decode_scales(photos[1])
    rng = np.random.default_rng(0)
    kernels = resize_kernels(
        [web_jpeg(photos[int(rng.integers(len(photos)))], rng) for _ in range(args.images)]
    )
    if args.json:
        results = {"decode_ms_by_scale": scales, "resize_kernels": kernels}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
