"""What resized shards cost in quality where it counts: at the 224 px the model sees.

For web-size photographs (the MMC4 benchmark's generator), each output of a conversion setting is
put through the loader's geometry (short side 224 with PIL bicubic, centre crop) and compared with
the source put through the same geometry: PSNR and SSIM at 224 px, and bytes against the baseline converter
(full-size PIL decode + re-encode at PIL's default quality, 75). Also: PSNR at the stored size against
the converter's own pixels before the encode (what the encode alone costs, for uses other than a
224 px centre crop), the share of outputs under 11,000 bytes (open_flamingo's own loader skips
those), and the time to decode an output at full scale (the loader's cost per image). Images kept
byte for byte (already under the short side) match exactly and are left out of the scores. A row
without any re-encode (the 256 px picture kept lossless) shows what the two resamples cost alone.
One process, one run.
Usage: python benchmarks/bench_quality_at_224.py [--images 300]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import load_photos, web_jpeg  # noqa: E402

from flamingo_data.images.resize import resize_pixels  # noqa: E402
from flamingo_data.images.stage import ImagePolicy, process_image, turbo_decode  # noqa: E402

SIZE = 224
OPEN_FLAMINGO_MIN_BYTES = 11_000  # its MMC4 path skips an image when len // 1000 <= 10
ANNEX_K = {"jpeg_tables": "annex-k"}  # libjpeg's own tables: the default before Robidoux's
SETTINGS = [
    ("--short-side 256 (quality 70, default)", ImagePolicy(short_side=256)),
    *(
        (f"--short-side 256 -q {q}", ImagePolicy(short_side=256, quality=q))
        for q in (90, 85, 80, 75, 65)
    ),
    *(
        (
            f"--short-side 256 -q {q} --jpeg-tables annex-k",
            ImagePolicy(short_side=256, quality=q, **ANNEX_K),
        )
        for q in (90, 75, 70, 60)
    ),
    ("--short-side 320 (quality 70)", ImagePolicy(short_side=320)),
    ("--short-side 320 -q 90", ImagePolicy(short_side=320, quality=90)),
    ("--short-side 320 -q 95", ImagePolicy(short_side=320, quality=95)),
]
JPEGLI_SETTINGS = [  # the optional encoder (pip install 'flamingo-data[jpegli]')
    (f"--short-side 256 -q {q} --encoder jpegli", {"short_side": 256, "quality": q})
    for q in (90, 85, 80, 75, 70)
]


def settings() -> list[tuple[str, ImagePolicy]]:
    try:
        jpegli = [(label, ImagePolicy(**kw, encoder="jpegli")) for label, kw in JPEGLI_SETTINGS]
    except ValueError:
        print("(jpegli rows skipped: its extra is not installed)")
        jpegli = []
    return [*SETTINGS, *jpegli]


def at_model_size(data: bytes) -> np.ndarray:
    """The loader's geometry, done the reference way: short side to 224 (bicubic), centre crop."""
    return model_view(Image.open(io.BytesIO(data)).convert("RGB"))


def model_view(image: Image.Image) -> np.ndarray:
    scale = SIZE / min(image.size)
    size = (max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
    return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float64)


def baseline(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def resampled_only(data: bytes, dct_scaled: bool, short_side: int = 256) -> np.ndarray:
    """The source resized to ``short_side`` (bicubic) and then through the loader's geometry, with no
    JPEG in between: the floor any re-encode at that size starts from. ``dct_scaled`` decodes as the
    converter does (smallest DCT scale covering the target), else at full size."""
    width, height = Image.open(io.BytesIO(data)).size
    scale = short_side / min(width, height)
    target = (round(width * scale), round(height * scale))
    limit = short_side if dct_scaled else max(width, height)
    pixels = turbo_decode(data, (width, height), limit, width * height)
    return model_view(resize_pixels(pixels, target, "bicubic"))


def scores(outputs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    """Median PSNR (dB) and median SSIM of pictures at 224 against their references."""
    psnr = [
        10 * np.log10(255.0**2 / np.mean((out - ref) ** 2))
        for out, ref in zip(outputs, refs, strict=True)
    ]
    ssim = [
        structural_similarity(out, ref, channel_axis=2, data_range=255.0)
        for out, ref in zip(outputs, refs, strict=True)
    ]
    return float(np.median(psnr)), float(np.median(ssim))


def stored_reference(source: bytes, size: tuple[int, int]) -> np.ndarray:
    """The converter's pixels before its encode: DCT-scaled decode + bicubic to ``size``."""
    width, height = Image.open(io.BytesIO(source)).size
    pixels = turbo_decode(source, (width, height), min(size), width * height)
    return np.asarray(resize_pixels(pixels, size, "bicubic"), dtype=np.float64)


def psnr_at_stored_size(outputs: list[bytes], sources: list[bytes]) -> float:
    """Median PSNR of re-encoded outputs against their own pre-encode pixels."""
    values = []
    for out, src in zip(outputs, sources, strict=True):
        decoded = simplejpeg.decode_jpeg(out).astype(np.float64)
        ref = stored_reference(src, (decoded.shape[1], decoded.shape[0]))
        values.append(10 * np.log10(255.0**2 / np.mean((decoded - ref) ** 2)))
    return float(np.median(values))


def measure(convert: Callable[[bytes], bytes], sources: list[bytes], refs: list[np.ndarray]):
    """(total bytes, median PSNR dB and SSIM at 224 over the images that were re-encoded, median
    PSNR at the stored size, share of outputs under 11,000 bytes, mean ms to decode one output with
    libjpeg-turbo: what the loader pays per image, best of 3 passes)."""
    outputs = [convert(data) for data in sources]
    changed = [
        (out, src, ref) for out, src, ref in zip(outputs, sources, refs, strict=True) if out != src
    ]
    psnr, ssim = scores([at_model_size(out) for out, _, _ in changed], [r for _, _, r in changed])
    stored = psnr_at_stored_size([o for o, _, _ in changed], [s for _, s, _ in changed])
    small = sum(len(out) < OPEN_FLAMINGO_MIN_BYTES for out in outputs) / len(outputs)
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        for out in outputs:
            simplejpeg.decode_jpeg(out)
        passes.append((time.perf_counter() - start) * 1e3 / len(outputs))
    return sum(len(out) for out in outputs), psnr, ssim, stored, small, min(passes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(3)
    photos = load_photos()
    sources = [web_jpeg(photos[int(rng.integers(len(photos)))], rng) for _ in range(args.images)]
    refs = [at_model_size(data) for data in sources]
    base_bytes, base_db, base_ssim, _, base_small, base_ms = measure(baseline, sources, refs)
    print(f"{len(sources)} web-size photos; scores at {SIZE} px after the loader's resize + crop")
    print(
        f"{'setting':<48} {'bytes vs baseline':>18} {'PSNR dB @224':>13} {'SSIM @224':>10}"
        f" {'PSNR dB stored':>15} {'< 11 kB':>8} {'decode ms':>10}"
    )
    row = "{:<48} {:18.3f} {:13.2f} {:10.4f} {:15.2f} {:8.0%} {:10.2f}"
    nan = float("nan")
    print(
        row.format(
            "baseline (full size, quality 75)", 1.0, base_db, base_ssim, nan, base_small, base_ms
        )
    )
    names = ("bytes_ratio", "psnr_db_224", "ssim_224", "psnr_db_stored", "under_11kb", "decode_ms")
    baseline_row = (1.0, base_db, base_ssim, None, base_small, base_ms)
    results = {"baseline": dict(zip(names, baseline_row, strict=True))}
    resized = [
        (src, ref)
        for src, ref in zip(sources, refs, strict=True)
        if min(Image.open(io.BytesIO(src)).size) > 256
    ]
    for label, dct_scaled in (("full decode", False), ("DCT-scaled decode", True)):
        floor = scores(
            [resampled_only(src, dct_scaled) for src, _ in resized], [r for _, r in resized]
        )
        print(row.format(f"256 px lossless, {label}", nan, *floor, nan, nan, nan))
    for label, policy in settings():
        size, *figures = measure(lambda data, p=policy: process_image(data, p).data, sources, refs)
        print(row.format(label, size / base_bytes, *figures))
        results[label] = dict(zip(names, (size / base_bytes, *figures), strict=True))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
