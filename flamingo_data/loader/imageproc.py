"""CLIP-style image preprocessing without torchvision: reduced-scale JPEG decode, resize, crop, normalize.

The resize is torch's antialiased bicubic on uint8 channels-last pixels: the same filter as PIL's
bicubic (torchvision's ``Resize(antialias=True)`` uses it), about 3x faster here than PIL's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from flamingo_data.images.stage import decode_at_least
from flamingo_data.loader.config import LoaderConfig

# An image whose resized long side would exceed this many crop sizes (a 4:1 panorama, an 8000 x 1
# strip) is cropped before it is resized, so the work is bounded by the output, not the aspect ratio.
MAX_RESIZE_FACTOR = 4


def preprocess_image(data: bytes, config: LoaderConfig, flip: bool = False) -> torch.Tensor:
    """Bytes -> normalized float tensor [3, S, S]; raises ValueError('too_many_pixels') or decode errors."""
    return normalize(image_pixels(data, config, flip), config.mean, config.std)


def image_pixels(data: bytes, config: LoaderConfig, flip: bool = False) -> torch.Tensor:
    """Bytes -> resized, cropped uint8 pixels [3, S, S]: what a worker sends (4x smaller than
    float32); ``vision_batch`` normalizes them on the receiving side."""
    size = config.image_size
    pixels, full = decode_at_least(data, size, config.max_pixels)
    image, target = torch.from_numpy(pixels).permute(2, 0, 1), short_side_target(full, size)
    if max(target) > MAX_RESIZE_FACTOR * size:
        image = crop_then_resize(image, target, size)
    else:
        image = center_crop(resize_short_side(image, target), size)
    return image.flip(-1) if flip else image


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


def crop_then_resize(image: torch.Tensor, target: tuple[int, int], size: int) -> torch.Tensor:
    """The centre crop of ``resize_short_side(image, target)`` without resizing the whole image:
    only the source pixels the crop reads (with the filter's reach) are resized, at the same scale.
    Resizing an 8000 x 1 strip whole to 224 x 1,792,000 took 2.7 GB; this window is 8 pixels wide."""
    (top, bottom, row, scale_h), (left, right, col, scale_w) = (
        _crop_window(n, t, size) for n, t in zip(image.shape[-2:], target, strict=True)
    )
    resized = F.interpolate(
        image[None, :, top:bottom, left:right],
        scale_factor=(scale_h, scale_w),
        mode="bicubic",
        antialias=True,
        recompute_scale_factor=False,
    )[0]
    return resized[:, row : row + size, col : col + size]


def _crop_window(source: int, target: int, size: int) -> tuple[int, int, int, float]:
    """Along one axis: the source pixels [start, stop) that the centre crop of a ``source`` ->
    ``target`` resize reads, where the crop starts in that window once resized, and the resize's
    scale factor. Bicubic reads 2 pixels each side (2 output pixels' worth when downscaling); the
    window reaches one more. The crop start is rounded to a whole output pixel of the window."""
    step = source / target  # source pixels per output pixel
    first = (target - size) // 2  # the crop's first output pixel
    reach = 2 * max(step, 1.0) + 1
    start = max(0, math.floor((first + 0.5) * step - 0.5 - reach))
    stop = min(source, math.ceil((first + size - 0.5) * step - 0.5 + reach) + 1)
    # torch sizes the output as floor(length * factor): nudge it so a whole axis gives ``target``
    return start, stop, round(first - start / step), target / source * (1 + 1e-12)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def normalize(image: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 [3, S, S] -> (x / 255 - mean) / std as float32."""
    return vision_batch(image[None], [1], 1, mean, std)[0, 0, 0]


def vision_batch(
    pixels: torch.Tensor, counts: list[int], slots: int, mean: tuple, std: tuple
) -> torch.Tensor:
    """uint8 images of a batch, back to back [N, 3, S, S], with each sample's image count ->
    the model's float32 ``vision_x`` [B, slots, 1, 3, S, S], zeros in the padding slots.

    numpy, not torch, on purpose: this runs in the training process, where torch's intra-op
    threads would spin against the loader workers for the cores (measured: up to 1.3x slower
    loading with 2 workers on 2 cores), and ``np.zeros`` leaves the padding slots as untouched
    zero pages instead of writing 29 MB of zeros per batch.
    """
    out = np.zeros((len(counts), slots, 1, *pixels.shape[1:]), dtype=np.float32)
    scale, shift = _scale_shift(tuple(mean), tuple(std))
    source = pixels.contiguous().numpy()
    start = 0
    for row, count in enumerate(counts):
        images = out[row, :count, 0]
        np.multiply(source[start : start + count], scale, out=images)  # one pass: x / 255 / std
        np.subtract(images, shift, out=images)  # and - mean / std
        start += count
    return torch.from_numpy(out)


def padded_uint8(pixels: torch.Tensor, counts: list[int], slots: int) -> torch.Tensor:
    """uint8 images back to back [N, 3, S, S] -> [B, slots, 1, 3, S, S] uint8, zeros in the
    padding slots: a copy, no arithmetic (``normalize_vision`` does that on the device); numpy for
    the reason ``vision_batch`` gives."""
    out = np.zeros((len(counts), slots, 1, *pixels.shape[1:]), dtype=np.uint8)
    source = pixels.contiguous().numpy()
    start = 0
    for row, count in enumerate(counts):
        out[row, :count, 0] = source[start : start + count]
        start += count
    return torch.from_numpy(out)


def normalize_vision(
    vision_x: torch.Tensor, image_counts: torch.Tensor, mean: tuple, std: tuple
) -> torch.Tensor:
    """A ``pixels="uint8"`` batch's ``vision_x`` and ``image_counts``, on any device -> the
    float32 ``vision_x`` the default loader gives, bit for bit (the same two float32 operations;
    padding slots zero). On a GPU this is the only per-pixel work, after a 4x smaller copy."""
    scale, shift = (torch.from_numpy(a).to(vision_x.device) for a in _scale_shift(mean, std))
    out = vision_x.float().mul_(scale).sub_(shift)
    slots = torch.arange(vision_x.shape[1], device=vision_x.device)
    padding = slots[None, :] >= image_counts.to(vision_x.device)[:, None]
    return out.masked_fill_(padding[:, :, None, None, None, None], 0.0)


@functools.cache
def _scale_shift(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    std_a = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    return 1.0 / (255.0 * std_a), mean_a / std_a
