"""Image preprocessing: the fast path (DCT-scaled decode + torch's antialiased bicubic) agrees with
the reference path (full PIL decode, PIL bicubic, centre crop, normalise) that open_flamingo uses."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, UnidentifiedImageError

from flamingo_data.loader import LoaderConfig
from flamingo_data.loader.imageproc import (
    center_crop,
    image_pixels,
    preprocess_image,
    resize_short_side,
    short_side_target,
    vision_batch,
)

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


def whole_resize_then_crop(data: bytes, size: int = 224) -> torch.Tensor:
    """The pixels as computed before extreme aspect ratios were cropped first: whole image resized."""
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    target = short_side_target(Image.open(io.BytesIO(data)).size, size)
    return center_crop(resize_short_side(pixels.permute(2, 0, 1), target), size)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_ordinary_images_give_the_same_pixels_as_a_whole_image_resize() -> None:
    """Up to a 4:1 aspect ratio the whole image is still resized: bit-identical to before."""
    for width, height in [(400, 300), (300, 400), (897, 224), (224, 896), (1000, 250)]:
        data = png(np.asarray(Image.open(io.BytesIO(smooth_jpeg(width, height)))))
        same = torch.equal(image_pixels(data, CONFIG), whole_resize_then_crop(data))
        assert same, (width, height)


def test_extreme_aspect_ratio_crop_first_matches_a_whole_image_resize() -> None:
    """Cropped before resizing, a 2000 x 10 strip (224 x 44,800 resized whole) and a 6000 x 1000
    panorama come out within half an output pixel of the whole resize: under a level on average."""
    for width, height in [(2000, 10), (10, 2000), (6000, 1000)]:
        data = png(np.asarray(Image.open(io.BytesIO(smooth_jpeg(width, height)))))
        out = image_pixels(data, CONFIG)
        diff = (out.int() - whole_resize_then_crop(data).int()).abs().float()
        assert out.shape == (3, 224, 224) and diff.mean() < 1.0, (width, height, diff.mean())


def test_crop_first_on_a_reduced_scale_jpeg_decode_matches_the_reference() -> None:
    """An 8000 x 800 JPEG decodes at 1/2 scale; its window comes from the full-size geometry."""
    data = smooth_jpeg(8000, 800)
    diff = levels(preprocess_image(data, CONFIG), reference(data))
    assert diff.mean() < 2.0, diff.mean()


def test_a_tiny_one_pixel_high_strip_stays_within_bounded_memory() -> None:
    """A 261-byte 60000 x 1 PNG was resized whole to 224 x 13,440,000 (9 GB in one allocation);
    now it gives a 224 x 224 image with 512 MB of address space to spare."""
    script = (
        "import io, resource, torch\n"
        "from PIL import Image\n"
        "from flamingo_data.loader import LoaderConfig\n"
        "from flamingo_data.loader.imageproc import image_pixels\n"
        "buf = io.BytesIO()\n"
        "Image.new('RGB', (60000, 1), (10, 200, 30)).save(buf, 'PNG')\n"
        "status = open('/proc/self/status').read().split('VmSize:')[1]\n"
        "used = int(status.split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + 2**29, resource.RLIM_INFINITY))\n"
        "out = image_pixels(buf.getvalue(), LoaderConfig())\n"
        "assert out.shape == (3, 224, 224) and (out[1] == 200).all(), out.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"


def test_an_eps_image_in_a_shard_never_runs_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader decodes shard images unsniffed; PIL opened any of its ~40 formats, and for EPS
    ran ``gs`` (Ghostscript, a PostScript interpreter) on the attacker's file."""
    marker = tmp_path / "gs_ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # look for gs again, on this PATH
    with pytest.raises(UnidentifiedImageError):
        image_pixels(EPS, CONFIG)
    assert not marker.exists()
