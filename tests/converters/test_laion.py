"""LAION parquet -> pair shards through a real img2dataset run against a local HTTP server."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.laion import (
    LaionOptions,
    convert_laion,
    detect_columns,
    input_columns,
)
from flamingo_data.converters.laion_shards import check_sample
from flamingo_data.demo.sample_data import make_image
from flamingo_data.errors import NothingWritten
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.images.stage import ImagePolicy
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import OutputExistsError, RunIncomplete, RunOptions, drop_work
from flamingo_data.storage.specs import SpecError
from tests.conftest import Route, serve, work_kept
from tests.test_upstream_compat import write_img2dataset_output

FAST = DownloadOptions(processes=1, threads=4, timeout=1, retries=0, samples_per_shard=4)


@pytest.fixture(scope="module")
def server():
    generator = serve()
    state = next(generator)
    yield state
    generator.close()


def serve_routes(server) -> tuple[list[str], list[str], dict[str, bytes]]:
    """(urls, captions) for 4 good images and 4 kinds of failure; caption -> served bytes."""
    served = {}
    for i, fmt in enumerate(("JPEG", "PNG", "JPEG", "PNG")):
        served[f"caption {i} é"] = server.add_image(f"img{i}.{fmt.lower()}", seed=i, fmt=fmt)
    server.routes["/page.html"] = Route(b"<html>not an image</html>", "text/html")
    server.routes["/corrupt.jpg"] = Route(make_image(9)[:200], "image/jpeg")
    server.routes["/stall.jpg"] = Route(make_image(8), "image/jpeg", delay_s=3.0)
    urls = [server.url(f"img{i}.{f}") for i, f in enumerate(("jpeg", "png", "jpeg", "png"))]
    urls += [server.url(p) for p in ("missing.jpg", "page.html", "corrupt.jpg", "stall.jpg")]
    captions = list(served) + ["404", "html", "corrupt", "stall"]
    return urls, captions, served


def write_parquet(
    server, path: Path, url_col: str = "URL", caption_col: str = "TEXT"
) -> dict[str, bytes]:
    """All 8 rows in one file; returns caption -> served bytes for the good ones."""
    urls, captions, served = serve_routes(server)
    pd.DataFrame({url_col: urls, caption_col: captions, "similarity": [0.3] * 8}).to_parquet(path)
    return served


def read_pairs(out: Path) -> dict[str, tuple[bytes, dict]]:
    """caption -> (image bytes, metadata) over every shard of ``out``."""
    pairs = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".txt"):
                meta = json.loads(members[name[:-4] + ".json"])
                image = next(
                    members[name[:-4] + e]
                    for e in (".jpg", ".png", ".webp")
                    if name[:-4] + e in members
                )
                pairs[data.decode()] = (image, meta)
    return pairs


def same_picture(got: bytes, want: bytes) -> bool:
    """The same size and nearly the same pixels (a re-encode may change a few)."""
    a = np.asarray(Image.open(io.BytesIO(got)).convert("RGB"), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(want)).convert("RGB"), dtype=np.float32)
    return a.shape == b.shape and float(np.abs(a - b).mean()) < 8.0


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Two parquet files (4 rows each, half failing) downloaded into 2 shards; ``punsafe`` holds
    NaN and Infinity, which JSON has not (img2dataset wrote them, validate refused the sample).
    img2dataset's own output is kept in ``i2d/`` (the run's clean-up of its work folder is held
    back once) for the tests that adopt it."""
    root = tmp_path_factory.mktemp("laion")
    urls, captions, served = serve_routes(server)
    for part, rows in enumerate((slice(0, 2), slice(2, 4))):
        picked = [*range(8)[rows], *range(4, 8)[rows]]
        frame = {"URL": [urls[i] for i in picked], "TEXT": [captions[i] for i in picked]}
        frame["similarity"] = [0.25 + i / 100 for i in picked]
        frame["punsafe"] = [float("nan") if part else float("inf"), 0.1, 0.1, 0.1]
        pd.DataFrame(frame).to_parquet(root / f"part-{part:05d}.parquet")
    with work_kept():
        stats = convert_laion(
            str(root / "part-{00000..00001}.parquet"),
            LaionOptions(download=FAST),
            RunOptions(out_dir=str(root / "out"), converter="laion", write_rejects=True),
        )
    shutil.copytree(root / "out" / "_work" / "_download", root / "i2d")
    drop_work(root / "out")
    return root, served, stats.to_json()


def test_end_to_end_captions_images_and_counted_failures(downloaded) -> None:
    root, served, stats = downloaded
    out = root / "out"
    assert validate_shards(str(out), deep=True).ok
    pairs = read_pairs(out)
    assert set(pairs) == set(served)
    for caption, (data, meta) in pairs.items():
        assert data == served[caption]  # small images are kept as they were served
        assert meta["caption"] == caption and meta["similarity"] >= 0.25  # extra column kept
        assert meta["punsafe"] in (None, 0.1)  # NaN, Infinity: null
    assert sorted(meta["punsafe"] is None for _, meta in pairs.values()) == [False] * 2 + [True] * 2
    assert stats["counts"]["rows"] == {"in": 8, "downloaded": 6, "rejected": 2}
    assert stats["reasons"]["rows"] == {"http_404": 1, "timeout": 1}
    # the page and the cut-off JPEG are fetched, then refused by the image stage
    assert stats["counts"]["samples"] == {"in": 6, "written": 4, "rejected": 2}
    assert stats["reasons"]["samples"] == {"not_an_image": 1, "undecodable_image": 1}
    # each shard loses a sample and img2dataset stores a PNG under .jpg: both are rewritten
    assert stats["counts"]["shards"] == {"rewritten": 2, "written": 2}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejects) == sorted(
        ["http_404", "not_an_image", "undecodable_image", "timeout"]
    )
    assert all(r["url"].startswith("http://127.0.0.1") for r in rejects)
    assert all(r["detail"] for r in rejects if r["kind"] == "rows")
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2}


def test_adopting_an_img2dataset_output_checks_and_rewrites_bad_samples(
    downloaded, tmp_path: Path
) -> None:
    root, served, _ = downloaded
    source = tmp_path / "i2d"
    source.mkdir()
    for path in (root / "i2d").glob("0*"):
        (source / path.name).write_bytes(path.read_bytes())
    shard = source / "00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    # break one good image (img2dataset writes a shard's samples in the order they finish)
    broken = next(m.name for m, d in members if d.startswith((b"\xff\xd8", b"\x89PNG")))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"<html>oops</html>" if member.name == broken else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stats = convert_laion(
        None,
        LaionOptions(),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
        from_img2dataset=str(source),
        execution=Execution(processes=2, progress=False),  # shards checked in 2 processes
    ).to_json()
    # the page and the cut-off JPEG were fetched, so they are samples the stage refuses
    assert stats["counts"]["samples"] == {"in": 6, "written": 3, "rejected": 3}
    assert stats["reasons"]["samples"] == {"not_an_image": 2, "undecodable_image": 1}
    assert stats["counts"]["shards"] == {"rewritten": 2, "written": 2}
    assert stats["counts"]["rows"]["in"] == 8  # img2dataset's own row counts are carried over
    assert validate_shards(str(tmp_path / "out"), deep=True).ok
    assert len(read_pairs(tmp_path / "out")) == 3


@pytest.mark.parametrize("link", [False, True])
def test_a_shard_the_stage_keeps_whole_is_copied_or_linked_unchanged(
    tmp_path: Path, link: bool
) -> None:
    source = tmp_path / "i2d"
    rows = [
        (f"http://127.0.0.1:9/{i}.jpg", f"cap {i}", make_image(i, 40, 30), "jpg") for i in range(3)
    ]
    write_img2dataset_output(source, rows)
    stats = convert_laion(
        None,
        LaionOptions(link=link),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
        from_img2dataset=str(source),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    how = "linked" if link else "copied"
    assert stats["counts"]["shards"] == {how: 1, "written": 1}
    placed = tmp_path / "out" / "00000.tar"
    assert placed.read_bytes() == (source / "00000.tar").read_bytes()
    assert (placed.stat().st_ino == (source / "00000.tar").stat().st_ino) is link


def test_images_go_through_the_image_stage(tmp_path: Path) -> None:
    """Resized to --max-side (256 by default), a PNG stored under .jpg gets its own member, a GIF
    is converted, and the shard is rewritten with them."""
    big = make_image(1, 600, 400)
    gif = io.BytesIO()
    Image.open(io.BytesIO(make_image(2, 50, 40))).save(gif, "GIF")
    rows = [
        ("http://127.0.0.1:9/big.jpg", "big", big, "jpg"),
        ("http://127.0.0.1:9/p.png", "png", make_image(3, 60, 50, "PNG"), "jpg"),
        ("http://127.0.0.1:9/g.gif", "gif", gif.getvalue(), "jpg"),
    ]
    write_img2dataset_output(tmp_path / "i2d", rows)
    stats = convert_laion(
        None,
        LaionOptions(),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
        from_img2dataset=str(tmp_path / "i2d"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["counts"]["shards"] == {"rewritten": 1, "written": 1}
    pairs = read_pairs(tmp_path / "out")
    assert Image.open(io.BytesIO(pairs["big"][0])).size == (256, 171)
    assert pairs["png"][0].startswith(b"\x89PNG") and pairs["gif"][0].startswith(b"\xff\xd8")
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert sorted(n.rsplit(".", 1)[1] for n in tar.getnames()).count("png") == 1
    smaller = LaionOptions(policy=ImagePolicy(short_side=32))
    convert_laion(
        None,
        smaller,
        RunOptions(out_dir=str(tmp_path / "short"), converter="laion"),
        from_img2dataset=str(tmp_path / "i2d"),
        execution=Execution(processes=1, progress=False),
    )
    assert min(Image.open(io.BytesIO(read_pairs(tmp_path / "short")["big"][0])).size) == 32


def test_the_earlier_resize_options_are_refused_naming_their_replacement(
    tmp_path: Path, capsys
) -> None:
    argv = ["convert", "laion", "--from-img2dataset", str(tmp_path), "--out", str(tmp_path / "o")]
    assert cli([*argv, "--image-size", "256"]) == 2
    assert "use --max-side N" in capsys.readouterr().err


def test_an_adopted_output_with_nan_in_its_json_is_written_with_null(
    jpeg_bytes: bytes, tmp_path: Path
) -> None:
    """img2dataset itself writes NaN/Infinity from a float column into <key>.json: the check passed
    such samples and validate refused every one; now the value is null and the sample kept."""
    source = tmp_path / "i2d"
    source.mkdir()
    metas = [
        '{"key": "000000000", "status": "success", "punsafe": NaN}',
        '{"key": "000000001", "status": "success", "punsafe": 0.5, "similarity": -Infinity}',
        '{"key": "000000002", "status": "success", "punsafe": 0.5}',
    ]
    with tarfile.open(source / "00000.tar", "w") as tar:
        for i, meta in enumerate(metas):
            for ext, data in (("jpg", jpeg_bytes), ("txt", f"cap {i}".encode()), ("json", meta)):
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"00000000{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (source / "00000_stats.json").write_text('{"count": 3, "successes": 3}')
    out = tmp_path / "out"
    stats = convert_laion(
        None,
        LaionOptions(),
        RunOptions(out_dir=str(out), converter="laion"),
        from_img2dataset=str(source),
    ).to_json()
    assert stats["counts"]["samples"] == {"in": 3, "written": 3, "non_finite_to_null": 2}
    assert stats["counts"]["shards"] == {"rewritten": 1, "written": 1}
    assert validate_shards(str(out), deep=True).ok
    with tarfile.open(out / "00000.tar") as tar:
        got = [json.loads(tar.extractfile(f"00000000{i}.json").read()) for i in range(3)]
    assert [(m["punsafe"], m.get("similarity")) for m in got] == [
        (None, None),
        (0.5, None),
        (0.5, None),
    ]
    nan = {"jpg": jpeg_bytes, "txt": b"c", "json": metas[0].encode()}
    assert (
        check_sample(nan, ImagePolicy(max_pixels=10_000)).reason == "bad_json"
    )  # as validate says


def test_sample_check_reasons(jpeg_bytes: bytes) -> None:
    meta = json.dumps({"key": "000000000", "status": "success"}).encode()
    good = {"jpg": jpeg_bytes, "txt": b"a cat", "json": meta}
    assert check_sample(good, ImagePolicy(max_pixels=10_000)).reason is None
    cases = {
        "missing_image": {"txt": b"a cat", "json": meta},
        "not_an_image": {**good, "jpg": b"<html></html>"},
        "undecodable_image": {**good, "jpg": jpeg_bytes[:300]},
        "missing_caption": {"jpg": jpeg_bytes, "json": meta},
        "empty_caption": {**good, "txt": b"  "},
        "caption_not_utf8": {**good, "txt": b"\xff\xfe"},
        "bad_json": {**good, "json": b"{"},
        "schema": {**good, "json": b'{"key": ""}'},
    }
    for reason, members in cases.items():
        assert check_sample(members, ImagePolicy(max_pixels=10_000)).reason == reason
    assert check_sample(good, ImagePolicy(max_pixels=64 * 48 - 1)).reason == "too_many_pixels"


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
    with pytest.raises(SpecError, match="has other columns"):  # img2dataset reads all files alike
        input_columns([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], LaionOptions())
    frame = {"url": ["u"], "caption": ["c"], "thumb": [b"\xff"], "score": [0.5]}
    pd.DataFrame(frame).to_parquet(tmp_path / "c.parquet")  # json cannot hold bytes: left out
    assert input_columns([str(tmp_path / "c.parquet")], LaionOptions())[2] == ["score"]


def test_a_file_that_is_not_parquet_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.parquet").write_text("hello")
    args = ["--parquet", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "out")]
    assert cli(["convert", "laion", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.parquet is not a readable parquet file" in err and "\n" not in err


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
    deadline, started = time.monotonic() + 60, tmp_path / "out" / "_work" / "_download" / "_tmp"
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--resume" in again.stderr  # never mixed up silently
    other = [*command, "--resume", "--max-side", "64"]  # would mix two image sizes
    refused = subprocess.run(other, capture_output=True, text=True, timeout=60)
    assert (
        refused.returncode == 2
        and "other options (policy.max_side: 256 in the run, 64 now)" in refused.stderr
    )
    resume = [*command, "--resume", "--threads", "2"]  # parallelism may change
    subprocess.run(resume, check=True, capture_output=True, timeout=180)
    assert set(read_pairs(tmp_path / "out")) == set(served)
    assert validate_shards(str(tmp_path / "out")).ok
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["counts"]["rows"] == {"in": 8, "downloaded": 6, "rejected": 2}
    assert stats["counts"]["samples"] == {"in": 6, "written": 4, "rejected": 2}


def test_remote_parquet_and_remote_out(downloaded, tmp_path, monkeypatch) -> None:
    """Parquet read from and shards written to fsspec storage: the same pairs, sizes and stats as
    the local run (img2dataset may order samples differently, so pairs are compared, not bytes)."""
    import fsspec

    root, _served, stats = downloaded
    monkeypatch.setenv("FLAMINGO_DATA_WORK", str(tmp_path / "work"))
    fs = fsspec.filesystem("memory")
    for part in ("part-00000.parquet", "part-00001.parquet"):
        fs.pipe_file(f"/laion-in/{part}", (root / part).read_bytes())
    got = convert_laion(
        "memory://laion-in/part-{00000..00001}.parquet",
        LaionOptions(download=FAST),
        RunOptions(out_dir="memory://laion-out/pairs", converter="laion", write_rejects=True),
    )
    try:
        local = tmp_path / "copy"
        local.mkdir()
        for path in fs.find("/laion-out"):
            (local / path.rsplit("/", 1)[1]).write_bytes(fs.cat_file(path))
        assert read_pairs(local) == read_pairs(root / "out")
        assert json.loads((local / "sizes.json").read_text()) == json.loads(
            (root / "out" / "sizes.json").read_text()
        )
        assert got.to_json() == stats and validate_shards(str(local)).ok
        assert not any((tmp_path / "work").iterdir())  # local downloads dropped after success
    finally:
        fs.rm("/laion-in", recursive=True)
        fs.rm("/laion-out", recursive=True)


def test_resume_into_a_finished_remote_out_refuses_other_options(
    server, tmp_path, monkeypatch
) -> None:
    """The local work folder is gone after a successful remote run; the bucket's own settings
    file still stops a resume that would leave the earlier run's extra shards beside the new."""
    import fsspec

    monkeypatch.setenv("FLAMINGO_DATA_WORK", str(tmp_path / "work"))
    write_parquet(server, tmp_path / "in.parquet")
    out = "memory://laion-settings/pairs"
    fs = fsspec.filesystem("memory")
    try:
        convert_laion(
            str(tmp_path / "in.parquet"),
            LaionOptions(download=FAST),
            RunOptions(out_dir=out, converter="laion"),
        )
        before = {p: fs.cat_file(p) for p in fs.find("/laion-settings")}
        assert before["/laion-settings/pairs/_settings.json"]
        other = LaionOptions(download=replace(FAST, samples_per_shard=8))
        with pytest.raises(OutputExistsError, match="other options"):
            convert_laion(
                str(tmp_path / "in.parquet"),
                other,
                RunOptions(out_dir=out, converter="laion", resume=True),
            )
        assert {p: fs.cat_file(p) for p in fs.find("/laion-settings")} == before
    finally:
        fs.rm("/laion-settings", recursive=True)


@pytest.mark.slow
def test_only_http_urls_are_fetched_never_local_files(server, tmp_path: Path) -> None:
    """A crafted ``file://`` url would copy this machine's files into the shards: bad_url, and the
    http rows of the same file still download, keys in place."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(make_image(4, fmt="PNG"))
    good = server.add_image("web.png", seed=5, fmt="PNG")
    urls = [secret.as_uri(), server.url("web.png"), "FTP://example.invalid/x.jpg"]
    pd.DataFrame({"url": urls, "caption": ["secret", "web", "ftp"]}).to_parquet(
        tmp_path / "p.parquet"
    )
    stats = convert_laion(
        str(tmp_path / "p.parquet"),
        LaionOptions(download=FAST),
        RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
    ).to_json()
    assert stats["counts"]["rows"] == {"in": 3, "downloaded": 1, "rejected": 2}
    assert stats["reasons"]["rows"] == {"bad_url": 2}
    pairs = read_pairs(tmp_path / "out")
    assert set(pairs) == {"web"} and same_picture(pairs["web"][0], good)
    assert pairs["web"][1]["key"].endswith("01")  # the row's own position


@pytest.mark.slow
def test_date_columns_are_kept_as_text_and_rows_img2dataset_drops_are_counted(
    server, tmp_path: Path
) -> None:
    """img2dataset's json.dumps cannot write a date: it prints the error and drops the row from
    every output file. Top-level dates are kept as text; what it still drops is counted."""
    good = server.add_image("dated.jpg", seed=11)
    urls = [server.url("dated.jpg"), server.url("missing.jpg")]
    when = [pd.Timestamp("2020-01-02"), pd.Timestamp("2021-03-04")]
    pd.DataFrame({"url": urls, "caption": ["dated", "gone"], "when": when}).to_parquet(
        tmp_path / "dates.parquet"
    )
    stats = convert_laion(
        str(tmp_path / "dates.parquet"),
        LaionOptions(download=FAST),
        RunOptions(out_dir=str(tmp_path / "dates"), converter="laion"),
    ).to_json()
    assert stats["counts"]["rows"] == {"in": 2, "downloaded": 1, "rejected": 1}
    pairs = read_pairs(tmp_path / "dates")
    assert same_picture(pairs["dated"][0], good) and pairs["dated"][1]["when"].startswith(
        "2020-01-02"
    )

    table = pa.table({"url": urls, "caption": ["a", "b"], "days": [[date(2020, 1, 2)]] * 2})
    pq.write_table(table, tmp_path / "nested.parquet")  # a list of dates still cannot be written
    out = tmp_path / "nested"
    with pytest.raises(NothingWritten, match="0 of 2 samples written"):  # stats.json says why
        convert_laion(
            str(tmp_path / "nested.parquet"),
            LaionOptions(download=FAST),
            RunOptions(out_dir=str(out), converter="laion", write_rejects=True),
        )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["rows"] == {"in": 2, "downloaded": 0, "rejected": 2}
    assert stats["reasons"]["rows"] == {"dropped_by_img2dataset": 1, "http_404": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    dropped = [r for r in rejects if r["reason"] == "dropped_by_img2dataset"]
    assert [(r["key"], r["shard"], r["row"]) for r in dropped] == [("000000", "00000.tar", 0)]


@pytest.mark.slow
def test_a_shard_img2dataset_could_not_finish_stops_the_run_and_resume_completes_it(
    server, tmp_path: Path
) -> None:
    """img2dataset prints "shard failed" and returns: the run must not succeed without its rows."""
    for i in range(4):
        server.add_image(f"part{i}.jpg", seed=20 + i)
    urls = [server.url(f"part{i}.jpg") for i in range(4)]
    pd.DataFrame({"url": urls, "caption": list("abcd")}).to_parquet(tmp_path / "p.parquet")
    options = LaionOptions(download=replace(FAST, samples_per_shard=2))
    blocker = tmp_path / "out" / "_work" / "_download" / "00001.tar"
    blocker.mkdir(parents=True)  # img2dataset cannot open this shard for writing
    resumed = RunOptions(out_dir=str(tmp_path / "out"), converter="laion", resume=True)
    run = partial(convert_laion, str(tmp_path / "p.parquet"), options, resumed)
    with pytest.raises(RunIncomplete, match="did not finish shard.s. 00001"):
        run()
    blocker.rmdir()
    stats = run().to_json()
    assert stats["counts"]["rows"] == {"in": 4, "downloaded": 4}
    assert set(read_pairs(tmp_path / "out")) == set("abcd")
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        "00000.tar": 2,
        "00001.tar": 2,
    }


def test_remote_inputs_get_the_same_url_refusal(server, tmp_path, monkeypatch) -> None:
    """Several remote parquet files are copied locally first: img2dataset must still read the
    copies whose ``file://`` urls were made unfetchable, not the raw copies."""
    import fsspec

    monkeypatch.setenv("FLAMINGO_DATA_WORK", str(tmp_path / "work"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(make_image(4, fmt="PNG"))
    server.add_image("web2.png", seed=6, fmt="PNG")
    fs = fsspec.filesystem("memory")
    for i, (url, caption) in enumerate(
        ((secret.as_uri(), "secret"), (server.url("web2.png"), "web"))
    ):
        buffer = io.BytesIO()
        pd.DataFrame({"url": [url], "caption": [caption]}).to_parquet(buffer)
        fs.pipe_file(f"/refusal-in/p{i}.parquet", buffer.getvalue())
    try:
        stats = convert_laion(
            "memory://refusal-in/p{0..1}.parquet",
            LaionOptions(download=FAST),
            RunOptions(out_dir=str(tmp_path / "out"), converter="laion"),
        ).to_json()
    finally:
        fs.rm("/refusal-in", recursive=True)
    assert stats["reasons"]["rows"] == {"bad_url": 1}
    assert set(read_pairs(tmp_path / "out")) == {"web"}


# ---- LAION as a unit converter: one unit per img2dataset shard ---------------------------------


def adoptable_output(folder: Path, shards: int = 3) -> Path:
    """An img2dataset output of ``shards`` finished shards (a failed row and a broken image
    in each), made without a download."""
    for shard in range(shards):
        rows = [
            (f"http://127.0.0.1:9/{shard}-{i}.jpg", f"cap {shard} {i}", image, "jpg")
            for i, image in enumerate(
                [make_image(10 * shard + i, 40, 30, "JPEG") for i in range(3)] + [None, b"oops"]
            )
        ]
        write_img2dataset_output(folder / f"part{shard}", rows)
        for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
            (folder / f"part{shard}" / name).rename(folder / name.replace("00000", f"{shard:05d}"))
        (folder / f"part{shard}").rmdir()
    return folder


def adopt(source: Path, out: Path, *args: str) -> int:
    argv = ["convert", "laion", "--from-img2dataset", str(source), "--out", str(out)]
    return cli([*argv, "--rejects", "--no-progress", *args])


def outputs(out: Path) -> dict[str, bytes]:
    names = [
        "sizes.json",
        "stats.json",
        "rejects.jsonl",
        *sorted(p.name for p in out.glob("*.tar")),
    ]
    return {name: (out / name).read_bytes() for name in names}


def test_each_img2dataset_shard_is_a_unit_with_its_marker(tmp_path: Path) -> None:
    source = adoptable_output(tmp_path / "i2d")
    assert adopt(source, tmp_path / "out", "--processes", "2") == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "_done").glob("*.json")) == [
        "00000.json",
        "00001.json",
        "00002.json",
    ]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["units"] == {"done": 3}
    assert stats["counts"]["rows"] == {"in": 15, "downloaded": 12, "rejected": 3}
    assert stats["counts"]["samples"] == {"in": 12, "written": 9, "rejected": 3}
    assert json.loads((out / "sizes.json").read_text()) == {f"0000{i}.tar": 3 for i in range(3)}
    # the made-up shards reuse their keys, so each shard is validated on its own
    assert all(validate_shards(str(out / f"0000{i}.tar"), deep=True).ok for i in range(3))


def test_resume_redoes_only_unfinished_units_and_refuses_other_options(
    tmp_path: Path, capsys
) -> None:
    source = adoptable_output(tmp_path / "i2d")
    assert adopt(source, tmp_path / "clean") == 0
    out = tmp_path / "out"
    assert adopt(source, out) == 0
    kept = (out / "00000.tar").stat().st_mtime_ns
    (out / "_done" / "00001.json").unlink()  # as if killed while this unit ran
    (out / "00001.tar").unlink()
    capsys.readouterr()
    assert adopt(source, out) == 2  # an earlier run: resume or overwrite
    assert "--resume or --overwrite" in capsys.readouterr().err
    assert adopt(source, out, "--resume", "--max-pixels", "1000") == 2
    assert "max_pixels" in capsys.readouterr().err
    assert adopt(source, out, "--resume") == 0
    assert (out / "00000.tar").stat().st_mtime_ns == kept  # a finished unit is not redone
    assert outputs(out) == outputs(tmp_path / "clean")


@pytest.mark.slow
def test_spark_checks_the_same_bytes_as_the_local_pool(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    source = adoptable_output(tmp_path / "i2d")
    assert adopt(source, tmp_path / "local", "--processes", "1") == 0
    spark = ["--executor", "spark", "--executor-master", "local[2]"]
    assert adopt(source, tmp_path / "spark", *spark) == 0
    assert outputs(tmp_path / "spark") == outputs(tmp_path / "local")
