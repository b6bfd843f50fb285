"""The JPEG quality re-encodes get when none is given: 70 with --short-side (the compact form, ~1/4
of the baseline converter's bytes), 90 otherwise; an explicit --quality always wins, and a run made
with the earlier default (90 everywhere) resumes only with --quality 90, the refusal saying so."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.images.jpeg_encoders import robidoux_table
from flamingo_data.images.stage import ImagePolicy, process_image

sys.path.insert(0, str(Path(__file__).parent))
from tests.images.test_jpeg_encoders import _source  # noqa: E402


@pytest.mark.parametrize(
    ("options", "quality"),
    [
        ({}, 90),
        ({"max_side": 512}, 90),
        ({"short_side": 256}, 70),
        ({"short_side": 256, "max_side": 512}, 70),
        ({"short_side": 256, "quality": 90}, 90),
        ({"quality": 40}, 40),
    ],
)
def test_the_default_quality_follows_short_side_and_an_explicit_one_wins(
    options: dict, quality: int
) -> None:
    policy = ImagePolicy(**options)
    assert policy.quality == quality
    assert policy.as_settings()["quality"] == quality  # markers record the value used


def _tables(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return image.quantization


def test_resized_and_converted_images_carry_the_quality_they_were_given() -> None:
    """The bytes, not just the policy: a resize is encoded at 70, a full-size conversion (PNG with
    transparency in a palette becomes RGB JPEG) at 90, and 70 is what --quality 70 gives."""
    _, photo = _source("coffee")
    resized = process_image(photo, ImagePolicy(short_side=200))
    assert resized.outcome == "resized" and _tables(resized.data)[0] == robidoux_table(70)
    assert resized.data == process_image(photo, ImagePolicy(short_side=200, quality=70)).data
    at_90 = process_image(photo, ImagePolicy(short_side=200, quality=90)).data
    assert _tables(at_90)[0] == robidoux_table(90) and len(resized.data) < 0.7 * len(at_90)
    buf = io.BytesIO()
    palette = Image.open(io.BytesIO(photo)).convert("RGB").quantize(64)
    palette.info["transparency"] = 0
    palette.save(buf, "PNG", transparency=0)
    converted = process_image(buf.getvalue(), ImagePolicy())
    assert converted.outcome == "converted" and _tables(converted.data)[0] == robidoux_table(90)


def _convert(sample: dict, out: Path, *extra: str) -> int:
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    return cli([*args, "--out", str(out), "--no-progress", "--processes", "1", *extra])


def _policy(out: Path) -> dict:
    return json.loads(next(out.glob("_done/*.json")).read_text())["settings"]["policy"]


def test_cli_default_and_explicit_quality_end_to_end(tmp_path: Path) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=6, missing_rate=0.0)
    runs = {"default": [], "q70": ["--quality", "70"], "q90": ["--quality", "90"]}
    for name, extra in runs.items():
        assert _convert(sample, tmp_path / name, "--short-side", "48", *extra) == 0
        assert validate_shards(str(tmp_path / name), deep=True).ok
    assert [_policy(tmp_path / n)["quality"] for n in runs] == [70, 70, 90]
    tars = {n: next((tmp_path / n).glob("*.tar")).read_bytes() for n in runs}
    assert tars["default"] == tars["q70"] and len(tars["q90"]) > len(tars["default"])
    assert _convert(sample, tmp_path / "full") == 0
    assert _policy(tmp_path / "full")["quality"] == 90


def test_a_run_made_with_the_earlier_default_resumes_only_at_its_quality(
    tmp_path: Path, capsys
) -> None:
    """Earlier versions wrote --short-side runs at 90 and recorded it. Resuming one with today's
    default would mix two qualities in one dataset: refused, one line naming both values."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=5, missing_rate=0.0)
    out = tmp_path / "out"
    assert _convert(sample, out, "--short-side", "48", "--quality", "90") == 0
    finished = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    next(out.glob("_done/*.json")).unlink()  # one unit left to do, as after a crash
    capsys.readouterr()
    assert _convert(sample, out, "--short-side", "48", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "(policy.quality: 90 in the run, 70 now)" in err and len(err.splitlines()) == 1
    assert _convert(sample, out, "--short-side", "48", "--quality", "90", "--resume") == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == finished
