"""LAION parquet -> pair shards through a real img2dataset run against a local HTTP server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flamingo_data.converters.laion import LaionOptions, convert_laion, detect_columns
from flamingo_data.download import DownloadOptions
from flamingo_data.samples import make_image
from flamingo_data.specs import SpecError
from flamingo_data.validate import validate_shards
from tests.conftest import Route, serve

FAST = DownloadOptions(processes=1, threads=4, timeout=1, retries=0, samples_per_shard=4)


@pytest.fixture(scope="module")
def server():
    generator = serve()
    state = next(generator)
    yield state
    generator.close()


def write_parquet(
    server, path: Path, url_col: str = "URL", caption_col: str = "TEXT"
) -> dict[str, bytes]:
    """4 good images and 4 kinds of failure; returns caption -> served bytes for the good ones."""
    served = {}
    for i, fmt in enumerate(("JPEG", "PNG", "JPEG", "PNG")):
        served[f"caption {i} é"] = server.add_image(f"img{i}.{fmt.lower()}", seed=i, fmt=fmt)
    server.routes["/page.html"] = Route(b"<html>not an image</html>", "text/html")
    server.routes["/corrupt.jpg"] = Route(make_image(9)[:200], "image/jpeg")
    server.routes["/stall.jpg"] = Route(make_image(8), "image/jpeg", delay_s=3.0)
    urls = [server.url(f"img{i}.{f}") for i, f in enumerate(("jpeg", "png", "jpeg", "png"))]
    urls += [
        server.url("missing.jpg"),
        server.url("page.html"),
        server.url("corrupt.jpg"),
        server.url("stall.jpg"),
    ]
    captions = list(served) + ["404", "html", "corrupt", "stall"]
    pd.DataFrame({url_col: urls, caption_col: captions, "similarity": [0.3] * 8}).to_parquet(path)
    return served


def read_pairs(out: Path) -> dict[str, bytes]:
    pairs = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".txt"):
                pairs[data.decode()] = members[name[:-4] + ".jpg"]
    return pairs


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("laion")
    served = write_parquet(server, root / "part-00000.parquet")
    stats = convert_laion(
        str(root / "part-{00000..00001}.parquet"),
        str(root / "out"),
        LaionOptions(download=FAST),
        write_rejects=True,
    )
    return root, served, stats.to_json()


def test_end_to_end_captions_images_and_counted_failures(downloaded) -> None:
    root, served, stats = downloaded
    out = root / "out"
    assert validate_shards(str(out), deep=True).ok
    pairs = read_pairs(out)
    assert set(pairs) == set(served)
    for caption, data in pairs.items():
        got, want = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(served[caption]))
        assert got.size == want.size  # small images are not upscaled
    assert stats["counts"]["rows"] == {"in": 8, "downloaded": 4, "rejected": 4}
    assert sum(stats["reasons"]["rows"].values()) == 4 and any(
        "404" in r for r in stats["reasons"]["rows"]
    )
    assert stats["counts"]["samples"] == {"in": 4, "written": 4}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 4 and all(r["url"].startswith("http://127.0.0.1") for r in rejects)
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 4


def test_adopting_an_img2dataset_output_checks_and_rewrites_bad_samples(
    downloaded, tmp_path: Path
) -> None:
    root, served, _ = downloaded
    source = tmp_path / "i2d"
    source.mkdir()
    for path in (root / "out" / "_download").glob("0*"):
        (source / path.name).write_bytes(path.read_bytes())
    shard = sorted(source.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:  # break the first sample's image
        for i, (member, data) in enumerate(members):
            data = b"<html>oops</html>" if i == 0 and member.name.endswith(".jpg") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stats = convert_laion(
        None, str(tmp_path / "out"), LaionOptions(), from_img2dataset=str(source)
    ).to_json()
    assert stats["counts"]["samples"] == {"in": 4, "written": 3, "rejected": 1}
    assert stats["reasons"]["samples"] == {"not_an_image": 1}
    assert validate_shards(str(tmp_path / "out")).ok and len(read_pairs(tmp_path / "out")) == 3


def test_column_detection_and_clear_error(server, tmp_path: Path) -> None:
    pd.DataFrame({"url": ["u"], "caption": ["c"]}).to_parquet(tmp_path / "a.parquet")
    assert detect_columns(str(tmp_path / "a.parquet"), None, None) == ("url", "caption")
    pd.DataFrame({"link_to_image": ["u"], "words": ["c"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(SpecError, match="its columns are: link_to_image, words"):
        detect_columns(str(tmp_path / "b.parquet"), None, None)
    assert detect_columns(str(tmp_path / "b.parquet"), "link_to_image", "words") == (
        "link_to_image",
        "words",
    )


@pytest.mark.slow
def test_resume_after_a_killed_run(server, tmp_path: Path) -> None:
    served = write_parquet(server, tmp_path / "in.parquet", "url", "caption")
    command = [
        sys.executable,
        "-m",
        "flamingo_data",
        "convert",
        "laion",
        "--parquet",
        str(tmp_path / "in.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--threads",
        "4",
        "--timeout",
        "1",
        "--retries",
        "0",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "out" / "_download" / "_tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*command, "--resume"], check=True, capture_output=True, timeout=180)
    assert set(read_pairs(tmp_path / "out")) == set(served)
    assert validate_shards(str(tmp_path / "out")).ok
