"""The image stage shared by every converter: sniff, cap pixels, keep or convert, optional resize.

Source bytes are kept when they already are a decodable JPEG/PNG/WebP within policy (faster and
lossless); anything else is converted to an RGB JPEG, and the outcome says which happened.
``process_image`` never raises on bad data: it returns a rejected result with a reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from flamingo_data.errors import InputError
from flamingo_data.images.image_end import image_end
from flamingo_data.images.jpeg_encoders import (
    DEFAULT_ENCODER,
    DEFAULT_TABLES,
    check_encoder,
    encode_jpeg,
)
from flamingo_data.images.resize import RESIZE_FILTERS, resize_pixels

KEEPABLE = {"jpeg": {"RGB", "L"}, "png": {"RGB", "L", "RGBA", "LA", "P"}, "webp": {"RGB", "RGBA"}}
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a decompression bomb is far above this
# An image file is read no further than this: 2 bytes a pixel at the pixel cap (a losslessly
# compressed photo fits), while a multi-GB file would have been read whole into each worker.
DEFAULT_MAX_BYTES = 128 * 2**20
# JPEG quality of re-encodes when none is given. With --short-side the shards are the compact form
# for a model's input size, and 70 gives about a quarter of the baseline converter's bytes: see
# docs/benchmarks.md and benchmarks/bench_quality_at_224.py.
DEFAULT_QUALITY = 90
SHORT_SIDE_QUALITY = 70

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
# PIL's names for the formats above: the only decoders bytes from the web or a shard reach. PIL
# tries every plugin it has otherwise, and its EPS plugin runs Ghostscript on the file.
PIL_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """What the image stage accepts and produces. ``max_pixels`` is always on."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # a bigger file is too_many_bytes, read no further
    max_side: int | None = None
    short_side: int | None = None
    quality: int | None = None  # None: SHORT_SIDE_QUALITY with short_side, else DEFAULT_QUALITY
    min_side: int = 1
    verify: str = "structure"  # "structure": header + end-of-stream markers; "decode": decode every kept image
    resize_filter: str = "bicubic"  # a RESIZE_FILTERS name; see flamingo_data/images/resize.py
    encoder: str = (
        DEFAULT_ENCODER  # JPEG encoder for re-encodes; see flamingo_data/images/jpeg_encoders.py
    )
    jpeg_tables: str = DEFAULT_TABLES  # libjpeg-turbo's quantisation tables (jpegli has its own)

    def as_settings(self) -> dict[str, Any]:
        """The JSON form unit markers record. ``max_bytes`` only when changed: runs written
        before it existed then still resume."""
        settings = asdict(self)
        if self.max_bytes == DEFAULT_MAX_BYTES:
            del settings["max_bytes"]
        if self.jpeg_tables == "annex-k" or self.encoder != "libjpeg-turbo":
            del settings["jpeg_tables"]  # a marker without the setting means annex-k
        return settings

    def __post_init__(self) -> None:
        if self.quality is None:
            default = SHORT_SIDE_QUALITY if self.short_side else DEFAULT_QUALITY
            object.__setattr__(self, "quality", default)  # frozen: settled once, here
        if self.resize_filter not in RESIZE_FILTERS:
            raise InputError(f"resize_filter must be one of {sorted(RESIZE_FILTERS)}")
        if not 1 <= self.quality <= 100:
            raise InputError("quality must be 1..100")
        check_encoder(self.encoder, self.jpeg_tables)
        if self.max_bytes < 1:
            raise InputError("max_bytes must be at least 1")


@dataclass(frozen=True, slots=True)
class ImageResult:
    """``outcome`` is kept | trimmed | converted | resized | rejected; ``reason`` says why when not kept."""

    outcome: str
    data: bytes | None = None
    fmt: str | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome != "rejected"


def sniff_format(data: bytes) -> str | None:
    """The real format from the leading bytes, never from a file name."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def open_capped(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images over ``max_pixels`` before any pixel is decoded.
    Only ``PIL_FORMATS`` are opened (the loader hands it bytes no sniff has checked).

    Raises ``ValueError('too_many_pixels')`` for a bomb; PIL errors for undecodable headers.
    """
    _let_pil_open_up_to(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ValueError("too_many_pixels") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError("too_many_pixels")
    return image


def _let_pil_open_up_to(max_pixels: int) -> None:
    """PIL refuses images over twice its own ``MAX_IMAGE_PIXELS`` (179 M by default) whatever our
    cap, so a ``--max-pixels`` above that had no effect. Raised to the cap asked for, never
    lowered: PIL's check is the backstop (it also guards frames bigger than their canvas)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode to RGB with the pixel cap; JPEGs decode at reduced DCT scale when ``draft_size`` allows."""
    image = open_capped(data, max_pixels)
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image = ImageOps.exif_transpose(image) or image
    return _to_rgb(image)


def decode_at_least(
    data: bytes, short_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB pixels [H, W, 3] uint8 with short side >= ``short_side`` (or the whole image if smaller),
    and the full-scale (width, height) as displayed, so callers size their resize from the original.

    Plain RGB JPEGs decode through libjpeg-turbo's DCT scaling at the smallest M/8 scale that
    keeps the short side (simplejpeg): far less to decode and to resize than a full decode or
    PIL's power-of-two draft. Everything else (EXIF rotation, CMYK, grey, PNG, WebP) goes
    through PIL. The pixel cap is checked on the header before any pixel is decoded.
    """
    header = plain_jpeg_header(data)
    if header is None:
        image = open_capped(data, max_pixels)
        if not _turbo_decodable(image):
            return _decode_with_pil(image, short_side)
        width, height = image.size  # turbo-decodable: no rotation, so stored = displayed size
    elif header.mode == "RGB":
        width, height = header.width, header.height
    else:
        return _decode_with_pil(open_capped(data, max_pixels), short_side)
    if width * height > max_pixels:
        raise ValueError("too_many_pixels")
    return turbo_decode(data, (width, height), short_side, max_pixels), (width, height)


def turbo_decode(
    data: bytes, size: tuple[int, int], short_side: int, max_pixels: int
) -> np.ndarray:
    """A plain JPEG's pixels through libjpeg-turbo at the smallest DCT scale covering ``short_side``.

    libjpeg-turbo refuses a file over any warning, and "extraneous bytes before marker" is common
    on the web; PIL, which upstream open_flamingo decodes with, reads such files. So a refused file
    gets PIL's answer: the image is decoded (at the draft size) or, when really cut off, PIL raises.
    The stage, validate --deep and the loader thus agree with each other and with upstream.
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **dct_scale_limit(*size, short_side))
    except ValueError:
        return _decode_with_pil(open_capped(data, max_pixels), short_side)[0]


def _decode_with_pil(image: Image.Image, short_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    full = _displayed_size(image)
    if image.format == "JPEG":
        image.draft("RGB", (short_side, short_side))
    image = ImageOps.exif_transpose(image) or image
    return np.array(_to_rgb(image)), full


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """What the image stage needs from a plain JPEG header; ``mode`` is PIL's name (RGB or L)."""

    width: int
    height: int
    mode: str


def plain_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG that needs nothing from PIL, read by libjpeg-turbo (~50x faster).

    Plain means: no APP1 segment (EXIF or XMP, where a rotation would live), no MPF multi-picture
    segment, and 8-bit YCbCr, RGB or grey. None for anything else, and callers then ask PIL,
    which also gives the precise reject reason for a broken file.
    """
    if not data.startswith(b"\xff\xd8") or _has_app_metadata(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    mode = _TURBO_MODES.get(colorspace)
    return JpegHeader(width, height, mode) if mode else None


_TURBO_MODES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "L"}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})


def _has_app_metadata(data: bytes) -> bool:
    """True when a segment before the scan is APP1 (EXIF/XMP) or APP2 MPF, or the walk is unsure."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0xDA:
            return False
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif marker == 0xE1 or (marker == 0xE2 and data.startswith(b"MPF", pos + 4)):
            return True
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    """Full-scale size after the EXIF orientation is applied (orientations 5-8 swap the sides);
    any format, as ``exif_transpose`` rotates PNG, WebP and TIFF too."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _turbo_decodable(image: Image.Image) -> bool:
    """A JPEG simplejpeg decodes exactly as PIL would: YCbCr/RGB, no EXIF rotation to apply."""
    if image.format != "JPEG" or image.mode != "RGB":
        return False
    return image.getexif().get(0x0112, 1) in (0, 1)


def process_image(data: bytes | None, policy: ImagePolicy) -> ImageResult:
    """Run one image through the stage; never raises on bad bytes."""
    if not data:
        return ImageResult("rejected", reason="empty")
    if len(data) > policy.max_bytes:
        return ImageResult("rejected", reason="too_many_bytes")
    fmt = sniff_format(data)
    if fmt is None:
        return ImageResult("rejected", reason="not_an_image")
    if fmt == "jpeg" and policy.verify == "structure":
        header = plain_jpeg_header(data)
        if header is not None:
            return _plain_jpeg(data, header, policy)
    try:
        image = open_capped(data, policy.max_pixels)
    except ValueError as exc:  # PIL raises ValueError for some corrupt headers too
        reason = "too_many_pixels" if str(exc) == "too_many_pixels" else "undecodable"
        return ImageResult("rejected", reason=reason)
    except Exception:  # PIL raises many types for a corrupt header; all mean the same here
        return ImageResult("rejected", reason="undecodable")
    if min(image.size) < policy.min_side:
        return ImageResult("rejected", reason="too_small")
    try:
        return _keep_or_convert(data, fmt, image, policy)
    except Exception:  # truncated or corrupt pixel data surfaces only on decode
        return ImageResult("rejected", reason="undecodable")


def _plain_jpeg(data: bytes, header: JpegHeader, policy: ImagePolicy) -> ImageResult:
    """The common web case without PIL's header parse: same outcomes as the general path."""
    width, height = header.width, header.height
    if width * height > policy.max_pixels:
        return ImageResult("rejected", reason="too_many_pixels")
    if min(width, height) < policy.min_side:
        return ImageResult("rejected", reason="too_small")
    target = _target_size((width, height), policy)
    if target is None:
        return _kept(data, "jpeg", (width, height), image_end(data, "jpeg"))
    try:
        return _resized_turbo(data, (width, height), target, policy)
    except Exception:  # truncated or corrupt pixel data surfaces only on decode
        return ImageResult("rejected", reason="undecodable")


def _resized_turbo(
    data: bytes, size: tuple[int, int], target: tuple[int, int], policy: ImagePolicy
) -> ImageResult:
    """Reduced-scale decode of a plain JPEG (grey ones come back RGB), then the exact resize."""
    pixels = turbo_decode(data, size, min(target), policy.max_pixels)
    small = resize_pixels(pixels, target, policy.resize_filter)
    return _encoded("resized", small, policy, "resized")


def dct_scale_limit(width: int, height: int, short_side: int) -> dict[str, int]:
    """simplejpeg's size limit that picks the smallest 1/2, 1/4 or 1/8 DCT scale (or none) whose
    short side still covers ``short_side``.

    Only these scales: libjpeg-turbo's other M/8 scales take a slow IDCT path and are slower than
    a full decode (384x256 at 7/8: 0.63 ms, at 8/8: 0.28 ms; benchmarks/bench_decode_scales.py),
    so the resize that follows does the rest (a factor under 2).
    """
    short, factor = min(width, height), 1
    while factor < 8 and -(-short // (factor * 2)) >= short_side:
        factor *= 2
    return {"min_width" if width <= height else "min_height": -(-short // factor)}


def _keep_or_convert(data: bytes, fmt: str, image: Image.Image, policy: ImagePolicy) -> ImageResult:
    target = _target_size(image.size, policy)
    width, height = image.size
    if target is None and _keepable(fmt, image, data):
        end = image_end(data, fmt)
        if policy.verify == "decode":
            _verify_decodes(image)  # decoding is the proof; a stream it reads whole is kept whole
            end = end or len(data)
        return _kept(data, fmt, (width, height), end)
    reason = "resized" if target is not None else _why(fmt, image, data)
    if target is not None and _turbo_decodable(image):
        return _resized_turbo(data, image.size, target, policy)
    return _converted(image, target, policy, reason)


def _converted(
    image: Image.Image, target: tuple[int, int] | None, policy: ImagePolicy, reason: str
) -> ImageResult:
    """Decode (a JPEG at the DCT scale covering ``target``), apply the orientation, then resize to
    the size the full-scale picture gives: sized from the reduced decode instead, the long side
    of 15% of rotated JPEGs came out a pixel off (378 x 256 where 379 x 256 was due)."""
    final = _target_size(_displayed_size(image), policy) if target is not None else None
    if target is not None and image.format == "JPEG":
        image.draft("RGB", target)
    image = ImageOps.exif_transpose(image) or image
    rgb = _to_rgb(image)
    if final is None or final == rgb.size:
        return _encoded("converted", rgb, policy, reason)
    return _encoded(
        "resized", resize_pixels(np.asarray(rgb), final, policy.resize_filter), policy, reason
    )


def _encoded(outcome: str, rgb: Image.Image, policy: ImagePolicy, reason: str) -> ImageResult:
    data = encode_jpeg(rgb, policy.quality, policy.encoder, policy.jpeg_tables)
    return ImageResult(outcome, data, "jpeg", rgb.width, rgb.height, reason=reason)


def _keepable(fmt: str, image: Image.Image, data: bytes) -> bool:
    if image.mode not in KEEPABLE.get(fmt, set()) or getattr(image, "is_animated", False):
        return False
    if (image.mode == "P" and "transparency" in image.info) or _png_16_bit(fmt, data):
        return False
    return _orientation(fmt, image, data) in (0, 1)


def _png_16_bit(fmt: str, data: bytes) -> bool:
    """16 bits per channel, read from IHDR: PIL opens 16-bit RGB/RGBA/LA as plain RGB/RGBA, so
    its mode alone would keep twice the bytes that the 8-bit picture needs."""
    return fmt == "png" and data[12:16] == b"IHDR" and data[24:25] == b"\x10"


# Where a PNG can hold an orientation for PIL: an eXIf chunk, or a text chunk keyed as
# ImageMagick's EXIF profile or XMP (a keyword is never compressed).
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_ORIENTATION_KEYWORDS = (b"Raw profile type exif\x00", b"XML:com.adobe.xmp\x00")


def _png_may_hold_orientation(data: bytes) -> bool:
    """Walks the chunk headers only (a few dozen per image, not the megabytes of pixel data):
    True at a chunk that may hold an orientation before IEND. A walk that runs off the end finds
    none: the file is cut off there, which ``image_end``'s same walk then rejects as truncated."""
    pos, end = 8, len(data)
    while pos + 8 <= end:
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return True
        if kind in _PNG_TEXT_CHUNKS and data.startswith(_PNG_ORIENTATION_KEYWORDS, pos + 8):
            return True
        if kind == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


def _orientation(fmt: str, image: Image.Image, data: bytes) -> int:
    """The EXIF orientation PIL's ``exif_transpose`` would apply, in any format (a PNG or WebP
    may carry one too). A PNG is asked only when it may hold one: PIL decodes the whole image to
    find an eXIf chunk that follows the pixels."""
    if fmt == "png" and not _png_may_hold_orientation(data):
        return 1
    return image.getexif().get(0x0112, 1)


def _kept(data: bytes, fmt: str, size: tuple[int, int], end: int | None) -> ImageResult:
    """The source bytes, byte for byte; a cut-off stream is rejected, and bytes after a whole image
    (a motion photo's video, a camera trailer) are dropped with outcome ``trimmed``.

    ``end`` comes from ``image_end``: a cheap structural proof the file is whole that catches the
    common web failure (a cut-off download) without decoding; ``verify="decode"`` decodes.
    """
    if end is None:
        return ImageResult("rejected", reason="truncated")
    outcome = "kept" if end == len(data) else "trimmed"
    reason = None if outcome == "kept" else "bytes_after_image"
    return ImageResult(outcome, data[:end], fmt, *size, reason=reason)


def _verify_decodes(image: Image.Image) -> None:
    """Prove the pixels decode; JPEGs at 1/8 DCT scale (cheap, still reads the whole stream)."""
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


def _target_size(size: tuple[int, int], policy: ImagePolicy) -> tuple[int, int] | None:
    """The resized size under ``max_side``/``short_side``, or None when no resize is due (never upscales)."""
    width, height = size
    scale = 1.0
    if policy.max_side and max(width, height) > policy.max_side:
        scale = policy.max_side / max(width, height)
    if policy.short_side and min(width, height) * scale > policy.short_side:
        scale = policy.short_side / min(width, height)
    if scale >= 1.0:
        return None
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: alpha composited on white, 16-bit scaled down, first frame of animations.

    16-bit samples always run 0..65535 (a dark picture must stay dark); only 32-bit ``I``, whose
    range the file does not say, is taken as 8-bit when no value exceeds 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.uint32)
        scale = 257 if image.mode != "I" or arr.max(initial=0) > 255 else 1
        return Image.fromarray((arr // scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def _why(fmt: str, image: Image.Image, data: bytes) -> str:
    """Why bytes could not be kept as they are."""
    if getattr(image, "is_animated", False):
        return "animated"
    if fmt not in KEEPABLE:
        return f"format_{fmt}"
    if image.mode not in KEEPABLE[fmt]:
        return f"mode_{image.mode.lower().replace(';', '_')}"
    if _png_16_bit(fmt, data):
        return "bit_depth_16"
    return "exif_or_alpha"
