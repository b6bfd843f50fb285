"""The JPEG encoder for images the stage re-encodes: libjpeg-turbo (through Pillow) or Google's jpegli.

jpegli writes ordinary baseline 4:2:0 JPEGs, so every decoder reads them, the loader's fast path and
upstream open_flamingo's PIL included. On the benchmark's web photos at ``--short-side 256`` it
writes 11-13% fewer bytes than libjpeg-turbo at the same quality setting for about the same PSNR
(+0.4 dB at 90, -0.2 dB at 75), and 13% fewer at equal PSNR (benchmarks/bench_quality_at_224.py),
for ~0.15 ms more per image. It is an optional extra (``pip install 'flamingo-data[jpegli]'``),
chosen explicitly with ``--encoder jpegli``: the default never depends on what happens to be
installed, so the same options always give the same bytes.
"""

from __future__ import annotations

import importlib
import io

import numpy as np
from PIL import Image

ENCODERS = ("libjpeg-turbo", "jpegli")
DEFAULT_ENCODER = "libjpeg-turbo"
_INSTALL_HINT = "--encoder jpegli needs the optional extra: pip install 'flamingo-data[jpegli]'"


def check_encoder(name: str) -> None:
    """Fail at configuration time, with the fix, rather than on the first image in a worker."""
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {list(ENCODERS)}, not {name!r}")
    if name == "jpegli":
        _jpegli()


def encode_jpeg(image: Image.Image, quality: int, encoder: str = DEFAULT_ENCODER) -> bytes:
    """An RGB image as JPEG bytes at ``quality`` (1..100) with the named encoder."""
    if encoder == "jpegli":
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        return _jpegli().encode(pixels, image.width, image.height, quality)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def _jpegli():
    try:
        return importlib.import_module("pyjpegli")
    except ImportError as exc:
        raise ValueError(_INSTALL_HINT) from exc
