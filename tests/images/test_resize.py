"""The resize kernel choice: OpenCV (after a box reduce over a factor of 2), PIL's antialiased filters
for the others."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flamingo_data.images.resize import RESIZE_FILTERS, box_reduce, resize_pixels


def _photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus fine noise: detail a bad kernel would alias or blur."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 200 // width, y * 200 // height, (x + y) * 100 // (width + height)], -1)
    return (base + rng.integers(0, 40, (height, width, 3))).clip(0, 255).astype(np.uint8)


def _psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, float) - np.asarray(b, float)
    return float(10 * np.log10(255.0**2 / np.mean(diff**2)))


@pytest.mark.parametrize("name", ["bicubic", "bilinear"])
def test_small_factors_use_a_kernel_as_good_as_pils(name: str) -> None:
    pixels = _photo_like(420, 300)  # 1.17x down: the median left after a DCT-scaled decode
    ours = resize_pixels(pixels, (359, 256), name)
    pils = Image.fromarray(pixels).resize((359, 256), RESIZE_FILTERS[name])
    assert ours.size == (359, 256) and ours.mode == "RGB"
    assert ours.tobytes() != pils.tobytes()  # a different implementation ran...
    assert _psnr(ours, pils) > 35  # ...giving nearly the same picture


@pytest.mark.parametrize("name", ["lanczos", "area"])
def test_other_filters_are_pils_antialiased_resize(name: str) -> None:
    pixels = _photo_like(420, 300)
    expected = Image.fromarray(pixels).resize((358, 256), RESIZE_FILTERS[name])
    assert resize_pixels(pixels, (358, 256), name).tobytes() == expected.tobytes()


@pytest.mark.parametrize(("short", "block"), [(256, 2), (128, 4), (64, 8)])
def test_large_factors_average_blocks_first_as_a_dct_scaled_decode_does(short, block) -> None:
    """Over a factor of 2, ``block`` x ``block`` averages first (every source pixel counts), then
    the kernel: the same picture as the antialiased resize, far from a kernel that skips pixels."""
    size = (1200, 800)
    pixels = _photo_like(*size)
    target = (size[0] * short // size[1], short)
    reduced = box_reduce(pixels, target)
    assert reduced.shape[:2] == (size[1] // block, size[0] // block)
    height, width = reduced.shape[:2]
    blocks = pixels.reshape(height, block, width, block, 3).mean(axis=(1, 3))
    assert np.abs(reduced.astype(float) - blocks).max() <= 1  # rounding only
    ours = resize_pixels(pixels, target, "bicubic")
    antialiased = Image.fromarray(pixels).resize(target, Image.Resampling.BICUBIC)
    skipping = Image.fromarray(pixels).resize(target, Image.Resampling.NEAREST)
    assert ours.size == target
    assert _psnr(ours, antialiased) > 35 > _psnr(skipping, antialiased)
