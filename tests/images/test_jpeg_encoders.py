"""The JPEG encoder choice: libjpeg-turbo by default, jpegli on request (smaller, every decoder reads it)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import skimage.data
from PIL import Image

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.images.resize import resize_pixels
from flamingo_data.images.stage import ImagePolicy, plain_jpeg_header, process_image

PHOTOS = ("astronaut", "coffee", "chelsea")  # real photographs bundled with scikit-image


def _source(name: str) -> tuple[Image.Image, bytes]:
    image = Image.fromarray(getattr(skimage.data, name)())
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return image, buf.getvalue()


def _psnr_against_source(data: bytes, source: Image.Image) -> float:
    decoded = simplejpeg.decode_jpeg(data).astype(float)
    height, width = decoded.shape[:2]
    reference = np.asarray(source.resize((width, height), Image.Resampling.LANCZOS), float)
    return float(10 * np.log10(255.0**2 / np.mean((decoded - reference) ** 2)))


def test_jpegli_is_smaller_than_libjpeg_turbo_at_the_same_quality_and_no_worse() -> None:
    """Against libjpeg's own tables (Robidoux's are compared in test_jpeg_tables.py)."""
    sizes = {"libjpeg-turbo": 0, "jpegli": 0}
    for name in PHOTOS:
        source, data = _source(name)
        psnr = {}
        for encoder in sizes:
            policy = ImagePolicy(short_side=256, quality=90, encoder=encoder, jpeg_tables="annex-k")
            result = process_image(data, policy)
            assert result.outcome == "resized" and min(result.width, result.height) == 256
            sizes[encoder] += len(result.data)
            psnr[encoder] = _psnr_against_source(result.data, source)
        assert psnr["jpegli"] >= psnr["libjpeg-turbo"], name
    assert sizes["jpegli"] < 0.95 * sizes["libjpeg-turbo"]


def test_jpegli_output_is_a_plain_jpeg_every_decoder_reads_the_same() -> None:
    _, data = _source("coffee")
    out = process_image(data, ImagePolicy(short_side=200, encoder="jpegli")).data
    header = plain_jpeg_header(out)  # the loader's fast path takes it
    assert header is not None and header.mode == "RGB"
    with Image.open(io.BytesIO(out)) as image:  # upstream open_flamingo decodes with PIL
        assert image.format == "JPEG" and not image.info.get("progressive")
        pil = np.asarray(image.convert("RGB"), dtype=int)
    turbo = simplejpeg.decode_jpeg(out).astype(int)
    assert pil.shape == turbo.shape == (200, 300, 3)
    assert np.abs(pil - turbo).max() <= 2  # the two IDCTs agree to rounding


def test_jpegli_is_deterministic_and_the_default_is_pillows_encoder() -> None:
    source, data = _source("chelsea")
    jpegli = ImagePolicy(short_side=128, quality=80, encoder="jpegli")
    assert process_image(data, jpegli).data == process_image(data, jpegli).data
    png = io.BytesIO()
    source.save(png, "PNG")  # a PNG takes the PIL path: its pixels are exactly the source's
    policy = ImagePolicy(short_side=128, quality=80, jpeg_tables="annex-k")
    default = process_image(png.getvalue(), policy)
    expected = io.BytesIO()
    resized = resize_pixels(np.asarray(source), (default.width, default.height), "bicubic")
    resized.save(expected, "JPEG", quality=80)
    assert default.outcome == "resized" and default.data == expected.getvalue()
    assert process_image(png.getvalue(), jpegli).data != default.data


def test_unknown_or_uninstalled_encoder_is_refused_with_the_fix(monkeypatch) -> None:
    with pytest.raises(ValueError, match="encoder must be one of"):
        ImagePolicy(encoder="mozjpeg")
    monkeypatch.setitem(sys.modules, "pyjpegli", None)  # what a missing package looks like
    with pytest.raises(ValueError, match=r"pip install 'flamingo-data\[jpegli\]'"):
        ImagePolicy(encoder="jpegli")


def test_cli_encoder_option_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=6, missing_rate=0.0)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--short-side", "48", "--no-progress", "--processes", "1"]
    assert cli([*args, "--out", str(tmp_path / "turbo")]) == 0
    assert cli([*args, "--out", str(tmp_path / "jpegli"), "--encoder", "jpegli"]) == 0
    turbo, jpegli = (sorted((tmp_path / n).glob("*.tar")) for n in ("turbo", "jpegli"))
    assert len(turbo) == len(jpegli) == 1 and turbo[0].read_bytes() != jpegli[0].read_bytes()
    assert validate_shards([str(tmp_path / "jpegli")], deep=True).ok
    monkeypatch.setitem(sys.modules, "pyjpegli", None)
    assert cli([*args, "--out", str(tmp_path / "none"), "--encoder", "jpegli"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flamingo-data[jpegli]" in err[0]
