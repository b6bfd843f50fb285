"""Pixel resizing for the image stage: OpenCV's kernels after a DCT-scaled decode, PIL otherwise.

A plain JPEG is decoded by libjpeg-turbo at the smallest 1/2, 1/4 or 1/8 scale that still covers
the target, so the resize left over is a small one (factor < 2; 1.45 median on the benchmark's web
photos). There OpenCV's bicubic kernel is ~9x faster than PIL's antialiased one: 40.9 dB PSNR
against a full decode + Lanczos, where PIL's gives 43.1 (benchmarks/bench_decode_scales.py), both
far above the JPEG re-encode's own error (36.3 dB end to end at quality 90;
benchmarks/bench_resize_filters.py). Pixels decoded at full size (PNG, WebP, a rotated or CMYK
JPEG) are first box-averaged the way a DCT-scaled decode would, then the same kernel; the filters
where OpenCV is not faster keep PIL's antialiased resize.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import numpy as np
from PIL import Image

RESIZE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}

# Only where OpenCV is the faster one: routed to OpenCV, lanczos and area (non-integer factors) made
# bench_resize_filters.py slower than PIL's did (5.5 vs 4.1 and 3.2 vs 2.5 ms per image).
_CV2_FILTERS = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR"}


@cache
def _opencv() -> ModuleType:
    """OpenCV, imported by the first resize that uses it (validate, inspect and preview never do),
    set to one thread before any use: converters run a process per core already, and OpenCV's
    pool does not survive a fork (a forked worker that touches it can hang), so it is never started."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


MAX_FIXED_KERNEL_FACTOR = 2.0  # beyond this a fixed-width kernel would skip source pixels


def resize_pixels(pixels: np.ndarray, target: tuple[int, int], name: str) -> Image.Image:
    """[H, W, 3] uint8 -> RGB image of ``target`` (width, height) with the named filter."""
    if name not in _CV2_FILTERS:
        return Image.fromarray(pixels).resize(target, RESIZE_FILTERS[name])
    cv2 = _opencv()
    pixels = box_reduce(pixels, target)
    return Image.fromarray(
        cv2.resize(pixels, target, interpolation=getattr(cv2, _CV2_FILTERS[name]))
    )


def box_reduce(pixels: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Average ``k`` x ``k`` blocks, ``k`` the largest of 2, 4, 8 that leaves the resize a factor
    under 2: what a JPEG's DCT-scaled decode does, for pixels from any format (PNG, WebP, a
    rotated JPEG), so the fixed kernel after it reads every source pixel.

    On web-like photos to short side 256 this is 3.4x faster than PIL's antialiased bicubic and
    44.2 dB against a Lanczos reference (PIL's 48.5), above the JPEG encode's own error."""
    height, width = pixels.shape[:2]
    factor = max(width / target[0], height / target[1])
    k = 1
    while k < 8 and factor / (k * 2) >= 1:
        k *= 2
    if factor <= MAX_FIXED_KERNEL_FACTOR or k == 1:
        return pixels
    size = (max(target[0], -(-width // k)), max(target[1], -(-height // k)))
    return _opencv().resize(pixels, size, interpolation=_opencv().INTER_AREA)
