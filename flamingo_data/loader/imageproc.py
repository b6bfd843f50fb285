"""CLIP-style image preprocessing without torchvision: reduced-scale JPEG decode, resize, crop, normalize.

The resize is torch's antialiased bicubic on uint8 channels-last pixels: the same filter as PIL's
bicubic (torchvision's ``Resize(antialias=True)`` uses it), about 3x faster here than PIL's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from flamingo_data.images import decode_at_least
from flamingo_data.loader.config import LoaderConfig


def preprocess_image(data: bytes, config: LoaderConfig, flip: bool = False) -> torch.Tensor:
    """Bytes -> normalized float tensor [3, S, S]; raises ValueError('too_many_pixels') or decode errors."""
    size = config.image_size
    pixels, full = decode_at_least(data, size, config.max_pixels)
    image = resize_short_side(
        torch.from_numpy(pixels).permute(2, 0, 1), short_side_target(full, size)
    )
    image = center_crop(image, size)
    if flip:
        image = image.flip(-1)
    return normalize(image, config.mean, config.std)


def short_side_target(full: tuple[int, int], size: int) -> tuple[int, int]:
    """(height, width) with short side ``size``, from the full-scale size so that a reduced-scale
    decode crops exactly the region a full decode would."""
    width, height = full
    scale = size / min(width, height)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resize_short_side(image: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, *target] with torch's antialiased bicubic (PIL's filter)."""
    height, width = image.shape[-2:]
    if target == (height, width):
        return image
    resized = F.interpolate(image[None], size=target, mode="bicubic", antialias=True)
    return resized[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def normalize(image: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [3, S, S] -> (x / 255 - mean) / std as float32, in one scale and one shift."""
    scale, shift = _scale_shift(tuple(mean), tuple(std))
    return image.float().mul_(scale).sub_(shift)


@functools.cache
def _scale_shift(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / (255.0 * std_t), mean_t / std_t
