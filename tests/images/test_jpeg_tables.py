"""libjpeg-turbo re-encodes with Robidoux's quantisation tables: fewer bytes for the same picture,
still a plain baseline JPEG; libjpeg's own (Annex K) tables on request, so earlier runs resume."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.images.jpeg_encoders import robidoux_table
from flamingo_data.images.stage import ImagePolicy, plain_jpeg_header, process_image

sys.path.insert(0, str(Path(__file__).parent))
from tests.images.test_jpeg_encoders import _psnr_against_source, _source  # noqa: E402

# Robidoux's table as published (row-major), written out here independently of the module's copy.
PUBLISHED = [
    [16, 16, 16, 18, 25, 37, 56, 85],
    [16, 17, 20, 27, 34, 40, 53, 75],
    [16, 20, 24, 31, 43, 62, 91, 135],
    [18, 27, 31, 40, 53, 74, 106, 156],
    [25, 34, 43, 53, 69, 94, 131, 189],
    [37, 40, 62, 74, 94, 124, 169, 238],
    [56, 53, 91, 106, 131, 169, 226, 311],
    [85, 75, 135, 156, 189, 238, 311, 418],
]


def test_tables_scale_as_libjpeg_scales_and_stay_8_bit() -> None:
    """Quality 50 is the table itself (values over 255 capped: a 16-bit table makes an
    extended-sequential file some decoders refuse); 70 scales by 0.6; 100 is all ones."""
    capped = [min(v, 255) for row in PUBLISHED for v in row]
    assert robidoux_table(50) == capped
    assert robidoux_table(70)[:8] == [10, 10, 10, 11, 15, 22, 34, 51]
    assert robidoux_table(70)[-1] == 251  # 418 x 0.6 rounded
    assert robidoux_table(100) == [1] * 64
    assert robidoux_table(1) == [255] * 64  # 5000 % of every entry, capped


def test_default_output_carries_the_tables_and_is_a_baseline_jpeg() -> None:
    _, data = _source("coffee")
    out = process_image(data, ImagePolicy(short_side=200, quality=70)).data
    with Image.open(io.BytesIO(out)) as image:
        assert image.format == "JPEG" and not image.info.get("progressive")
        assert image.quantization == {0: robidoux_table(70), 1: robidoux_table(70)}
        assert image.layer[0][1:3] == (2, 2)  # 4:2:0: luma sampled 2 x 2 against chroma
        pil = np.asarray(image.convert("RGB"), dtype=int)
    assert b"\xff\xc0" in out and b"\xff\xc1" not in out  # SOF0 (baseline), not extended
    assert plain_jpeg_header(out) is not None  # the loader's fast path takes it
    assert np.abs(pil - simplejpeg.decode_jpeg(out).astype(int)).max() <= 2


def test_annex_k_gives_libjpegs_own_tables() -> None:
    _, data = _source("coffee")
    out = process_image(data, ImagePolicy(short_side=200, quality=70, jpeg_tables="annex-k")).data
    with Image.open(io.BytesIO(out)) as image:
        assert image.quantization[0][:4] == [10, 7, 6, 10]  # Annex K luma 16 11 10 16 x 0.6


def test_same_or_fewer_bytes_give_a_better_picture_than_libjpegs_tables() -> None:
    """For each photo, the highest quality whose output is no bigger than libjpeg's at 75 and at
    90 scores a higher PSNR at the stored 256 px (measured +0.3-0.5 dB and +0.1-0.3 dB)."""
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        source, data = _source(name)
        for annex_quality in (75, 90):
            annex = ImagePolicy(short_side=256, quality=annex_quality, jpeg_tables="annex-k")
            reference = process_image(data, annex).data
            ours = [
                process_image(data, ImagePolicy(short_side=256, quality=q)).data
                for q in range(60, 96)
            ]
            best = max((o for o in ours if len(o) <= len(reference)), key=len)
            gain = _psnr_against_source(best, source) - _psnr_against_source(reference, source)
            assert gain > 0.05, (name, annex_quality, gain)


def test_settings_name_the_tables_only_where_they_decide_the_bytes() -> None:
    """Runs made before the tables existed recorded no ``jpeg_tables``: annex-k (what they used)
    and jpegli (which ignores the tables) record none either, so those runs still resume."""
    assert ImagePolicy().as_settings()["jpeg_tables"] == "robidoux"
    assert "jpeg_tables" not in ImagePolicy(jpeg_tables="annex-k").as_settings()


def _convert(sample: dict, out: Path, *extra: str) -> int:
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    return cli([*args, "--out", str(out), "--no-progress", "--processes", "1", *extra])


def test_a_run_from_before_the_change_resumes_only_with_its_options(tmp_path: Path, capsys) -> None:
    """A marker as the earlier code wrote it (no ``jpeg_tables``): resuming with today's default
    tables would mix two kinds of JPEG in one dataset, so it is refused, naming the option."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=5, missing_rate=0.0)
    out = tmp_path / "out"
    before_the_change = ["--short-side", "48", "--jpeg-tables", "annex-k"]
    assert _convert(sample, out, *before_the_change) == 0
    marker = next(out.glob("_done/*.json"))
    assert "jpeg_tables" not in json.loads(marker.read_text())["settings"]["policy"]
    finished = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    marker.unlink()  # one unit left to do, as after a crash
    capsys.readouterr()
    assert _convert(sample, out, "--short-side", "48", "--resume") == 2
    err = capsys.readouterr().err
    assert (
        '(policy.jpeg_tables: unset in the run, "robidoux" now)' in err
        and len(err.strip().splitlines()) == 1
    )
    assert _convert(sample, out, *before_the_change, "--resume") == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == finished
    assert validate_shards(str(out), deep=True).ok


def test_cli_tables_option_end_to_end(tmp_path: Path) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=6, missing_rate=0.0)
    assert _convert(sample, tmp_path / "rob", "--short-side", "48") == 0
    assert (
        _convert(sample, tmp_path / "annex", "--short-side", "48", "--jpeg-tables", "annex-k") == 0
    )
    rob, annex = (sorted((tmp_path / n).glob("*.tar")) for n in ("rob", "annex"))
    assert len(rob) == len(annex) == 1 and rob[0].read_bytes() != annex[0].read_bytes()
    assert validate_shards(str(tmp_path / "rob"), deep=True).ok
    with pytest.raises(SystemExit) as refused:  # argparse: usage line + error, exit 2
        _convert(sample, tmp_path / "bad", "--jpeg-tables", "mozjpeg")
    assert refused.value.code == 2
