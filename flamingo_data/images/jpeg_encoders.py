"""The JPEG encoder for images the stage re-encodes: libjpeg-turbo (through Pillow) or Google's jpegli.

libjpeg-turbo quantises with N. Robidoux's tables by default (published for ImageMagick, and mozjpeg's
default too) rather than the JPEG standard's Annex K examples: smoother in the low frequencies and
coarser in the highest, they give the same PSNR and SSIM at 224 px in ~20% fewer bytes on the
benchmark's web photos, and as good or better on text, scanned pages and greyscale pictures
(benchmarks/bench_quality_at_224.py). They are scaled by ``quality`` with libjpeg's own rule and
capped at 255, so the files stay plain baseline 4:2:0 JPEGs that every decoder reads at its usual speed.
``--jpeg-tables annex-k`` gives libjpeg's own tables (what a marker without the setting means).

jpegli writes ordinary baseline 4:2:0 JPEGs with its own adaptive quantisation (the tables do not
apply to it). It is an optional extra (``pip install 'flamingo-data[jpegli]'``), chosen explicitly with
``--encoder jpegli``: the default never depends on what happens to be installed, so the same options
always give the same bytes.
"""

from __future__ import annotations

import importlib
import io

import numpy as np
from PIL import Image

from flamingo_data.errors import InputError, MissingExtra

ENCODERS = ("libjpeg-turbo", "jpegli")
DEFAULT_ENCODER = "libjpeg-turbo"
JPEG_TABLES = ("robidoux", "annex-k")
DEFAULT_TABLES = "robidoux"
# Robidoux's table in row-major order (as Pillow takes it); the same table serves luma and chroma.
_ROBIDOUX = (
    (16, 16, 16, 18, 25, 37, 56, 85),
    (16, 17, 20, 27, 34, 40, 53, 75),
    (16, 20, 24, 31, 43, 62, 91, 135),
    (18, 27, 31, 40, 53, 74, 106, 156),
    (25, 34, 43, 53, 69, 94, 131, 189),
    (37, 40, 62, 74, 94, 124, 169, 238),
    (56, 53, 91, 106, 131, 169, 226, 311),
    (85, 75, 135, 156, 189, 238, 311, 418),
)


def check_encoder(name: str, tables: str = DEFAULT_TABLES) -> None:
    """Fail at configuration time, with the fix, rather than on the first image in a worker."""
    if name not in ENCODERS:
        raise InputError(f"encoder must be one of {list(ENCODERS)}, not {name!r}")
    if tables not in JPEG_TABLES:
        raise InputError(f"jpeg_tables must be one of {list(JPEG_TABLES)}, not {tables!r}")
    if name == "jpegli":
        _jpegli()


def encode_jpeg(
    image: Image.Image,
    quality: int,
    encoder: str = DEFAULT_ENCODER,
    tables: str = DEFAULT_TABLES,
) -> bytes:
    """An RGB image as JPEG bytes at ``quality`` (1..100) with the named encoder."""
    if encoder == "jpegli":
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        return _jpegli().encode(pixels, image.width, image.height, quality)
    buf = io.BytesIO()
    if tables == "annex-k":
        image.save(buf, "JPEG", quality=quality, optimize=False)
    else:
        table = robidoux_table(quality)
        image.save(buf, "JPEG", qtables=[table, table], subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def robidoux_table(quality: int) -> list[int]:
    """The table scaled as libjpeg scales its own for ``quality`` and kept within 1..255: a
    16-bit table would make the file extended-sequential, which some decoders refuse."""
    factor = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (v * factor + 50) // 100)) for row in _ROBIDOUX for v in row]


def _jpegli():
    try:
        return importlib.import_module("pyjpegli")
    except ImportError as exc:
        raise MissingExtra("encoder 'jpegli'", "pyjpegli", "jpegli") from exc
