"""CLIP-style image preprocessing without torchvision: reduced-scale JPEG decode, resize, crop, normalize."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from flamingo_data.images import decode_rgb
from flamingo_data.loader.config import LoaderConfig


def preprocess_image(data: bytes, config: LoaderConfig, flip: bool = False) -> torch.Tensor:
    """Bytes -> normalized float tensor [3, S, S]; raises ValueError('too_many_pixels') or PIL errors."""
    size = config.image_size
    image = decode_rgb(data, config.max_pixels, draft_size=size)
    image = resize_short_side(image, size)
    image = center_crop(image, size)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(config.mean, dtype=np.float32)) / np.asarray(
        config.std, dtype=np.float32
    )
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if target == image.size else image.resize(target, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
