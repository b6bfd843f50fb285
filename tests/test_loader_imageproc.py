"""Image preprocessing: the fast path (DCT-scaled decode + torch's antialiased bicubic) agrees with
the reference path (full PIL decode, PIL bicubic, centre crop, normalise) that open_flamingo uses."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from flamingo_data.loader import LoaderConfig
from flamingo_data.loader.imageproc import preprocess_image, vision_batch

CONFIG = LoaderConfig()


def smooth_jpeg(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x * y) % 97 + 80], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def reference(data: bytes, size: int = 224) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(image.size)
    target = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(target, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    arr = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    arr = (arr - np.asarray(CONFIG.mean, np.float32)) / np.asarray(CONFIG.std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differences in 0-255 pixel levels (undoing the normalisation's std)."""
    std = torch.tensor(CONFIG.std).view(3, 1, 1)
    return ((a - b) * std * 255).abs()


def test_matches_the_reference_for_full_and_reduced_scale_decodes() -> None:
    for width, height in [(300, 240), (1000, 700), (640, 1280)]:
        data = smooth_jpeg(width, height)
        out = preprocess_image(data, CONFIG)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        diff = levels(out, reference(data))
        assert diff.mean() < 2.0, (width, height, diff.mean())


def test_png_and_flip() -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(smooth_jpeg(400, 300))).save(buf, "PNG")
    out = preprocess_image(buf.getvalue(), CONFIG)
    assert levels(out, reference(buf.getvalue())).mean() < 1.0
    flipped = preprocess_image(buf.getvalue(), CONFIG, flip=True)
    assert torch.equal(flipped, out.flip(-1))


def test_vision_batch_normalizes_each_sample_and_zero_pads() -> None:
    """Workers send uint8 images back to back; the batch is normalized and padded on arrival."""
    pixels = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = vision_batch(pixels, [2, 1], 3, mean, std)
    expected = (pixels.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    assert out.shape == (2, 3, 1, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, :2, 0], expected[:2], atol=1e-5)
    assert torch.allclose(out[1, 0, 0], expected[2], atol=1e-5)
    assert not out[0, 2:].any() and not out[1, 1:].any()  # padding slots stay exactly zero
