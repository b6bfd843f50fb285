"""The resize kernel choice: OpenCV after a DCT-scaled decode, PIL's antialiased filters elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flamingo_data.images.resize import RESIZE_FILTERS, resize_pixels


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


@pytest.mark.parametrize(
    ("name", "size"),
    [("bicubic", (1200, 800)), ("lanczos", (420, 300)), ("area", (420, 300))],
    ids=["factor-over-2", "lanczos", "area"],
)
def test_large_factors_and_other_filters_are_pils_antialiased_resize(name, size) -> None:
    pixels = _photo_like(*size)
    target = (size[0] * 256 // size[1], 256)
    expected = Image.fromarray(pixels).resize(target, RESIZE_FILTERS[name])
    assert resize_pixels(pixels, target, name).tobytes() == expected.tobytes()
