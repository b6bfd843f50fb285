"""convert mmc4 --download-images: MMC4 jsonl documents whose images are only urls, fetched from a
real HTTP server on 127.0.0.1 through img2dataset, with resume and --retry-failed."""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flamingo_data.check.validate import validate_shards
from flamingo_data.fetch.journal import read_journal
from flamingo_data.fetch.url_images import JOURNAL_DIR
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
from tests.conftest import LocalServer, Route
from tests.test_upstream_compat import read_like_open_flamingo

pytest.importorskip("img2dataset")


def noisy_image(seed: int, fmt: str = "JPEG") -> bytes:
    """Real image bytes over open_flamingo's 11,000-byte floor (noise compresses poorly)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def serve_image(server: LocalServer, path: str, seed: int, fmt: str = "JPEG") -> str:
    server.routes[f"/{path}"] = Route(noisy_image(seed, fmt), f"image/{fmt.lower()}")
    return server.url(path)


def document(urls: list[str], n_sentences: int = 3) -> dict:
    """An MMC4 document: image i matched to sentence i % n_sentences."""
    return {
        "url": "https://example.com/page",
        "text_list": [f"Sentence {i} of the page." for i in range(n_sentences)],
        "image_info": [
            {
                "image_name": f"img{i}.jpg",
                "raw_url": url,
                "matched_text_index": i % n_sentences,
                "matched_sim": 0.3,
            }
            for i, url in enumerate(urls)
        ],
        "similarity_matrix": [
            [0.3 if j == i % n_sentences else 0.1 for j in range(n_sentences)]
            for i in range(len(urls))
        ],
    }


def write_docs(path: Path, docs: list[dict]) -> Path:
    text = "".join(json.dumps(d) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
    return path


def cli(converter: str, *args: str) -> list[str]:
    """The command line of ``flamingo-data convert <converter> <args>`` in this interpreter."""
    return [sys.executable, "-m", "flamingo_data", "convert", converter, *args]


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = cli("mmc4", "--processes", "1", "--timeout", "3", "--retries", "0", *args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_download_counts_every_failure_once_per_url_and_writes_trainable_shards(
    http_server: LocalServer, tmp_path: Path
) -> None:
    shared = serve_image(http_server, "shared.jpg", 1)
    png = serve_image(http_server, "cut-out.png", 2, "PNG")
    good = [serve_image(http_server, f"photo{i}.jpg", 10 + i) for i in range(4)]
    http_server.routes["/slow.jpg"] = Route(noisy_image(5), delay_s=8)
    http_server.routes["/opted-out.jpg"] = Route(noisy_image(6), headers={"X-Robots-Tag": "noai"})
    http_server.routes["/to-file.jpg"] = Route(
        b"", status=302, headers={"Location": "file:///etc/passwd"}
    )
    http_server.routes["/robots.txt"] = Route(b"User-agent: *\nDisallow: /private/\n", "text/plain")
    http_server.routes["/private/x.jpg"] = Route(noisy_image(9))
    private = http_server.url("private/x.jpg")
    missing, slow = http_server.url("gone.jpg"), http_server.url("slow.jpg")
    opted, to_file = http_server.url("opted-out.jpg"), http_server.url("to-file.jpg")
    docs_a = write_docs(
        tmp_path / "docs_00000.jsonl",
        [
            document([shared, good[0], missing]),
            document([shared, good[1]]),
            document([slow, opted]),  # no image left: dropped (no_images)
        ],
    )
    docs_b = write_docs(
        tmp_path / "docs_00001.jsonl.gz",
        [
            document([shared, png, to_file]),
            document([good[2], good[3], "ftp://example.com/x.jpg", private]),
        ],
    )
    out, images = tmp_path / "out", tmp_path / "downloads"
    done = convert(
        "--docs",
        str(docs_a),
        str(docs_b),
        "--images",
        str(images),
        "--download-images",
        "--out",
        str(out),
        "--rejects",
    )

    assert all(hits == 1 for hits in http_server.hits.values()), http_server.hits
    assert http_server.hits["/shared.jpg"] == 1  # named by three documents, fetched once
    assert "/private/x.jpg" not in http_server.hits  # robots.txt disallows it: never requested
    assert "/etc/passwd" not in done.stderr
    assert "11/11" in done.stderr and "img" in done.stderr  # the download's progress bar
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["documents"] == {"in": 5, "written": 4, "rejected": 1}
    assert stats["reasons"]["documents"] == {"no_images": 1}
    assert stats["reasons"]["images"] == {
        "http_404": 1,
        "timeout": 1,
        "opted_out": 2,
        "bad_url": 2,
    }
    assert stats["counts"]["urls"] == {"in": 11, "fetched": 6, "rejected": 5}
    assert stats["counts"]["images"] == {"in": 14, "found": 8, "kept": 8, "rejected": 6}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["url"] for r in rejects if r.get("kind") == "images"} >= {missing, slow, opted}

    shards = sorted(str(p) for p in out.glob("*.tar"))
    report = validate_shards(shards, deep=True)
    assert report.ok and report.samples == 4 and report.images == 8
    read, drops = read_like_open_flamingo(shards)
    assert not drops and sum(len(pairs) for pairs in read.values()) == 8
    options = LoaderConfig(batch_size=4, image_size=32, max_images=4, shuffle_shards=False)
    [batch] = list(build_loader([DatasetSpec("d", str(out))], make_tokenizer(None), options))
    assert batch["vision_x"].shape[:2] == (4, 4)


def test_an_interrupted_download_resumes_without_fetching_a_url_twice(
    http_server: LocalServer, tmp_path: Path
) -> None:
    urls = [serve_image(http_server, f"p{i}.jpg", i) for i in range(16)]
    for url in urls:
        http_server.routes["/" + url.rsplit("/", 1)[1]].delay_s = 0.25
    docs = write_docs(
        tmp_path / "docs_00000.jsonl", [document(urls[i : i + 2]) for i in range(0, 16, 2)]
    )
    out, images = tmp_path / "out", tmp_path / "downloads"
    args = [
        "--docs",
        str(docs),
        "--images",
        str(images),
        "--download-images",
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
    ]
    command = cli("mmc4", "--processes", "1", "--timeout", "5", *args)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(read_journal(images / JOURNAL_DIR)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr[-2000:]
    logged = {url.rsplit("/", 1)[1] for url in read_journal(images / JOURNAL_DIR)}
    assert 4 <= len(logged) < 16

    convert(*args, "--resume", "--timeout", "5")
    # a url whose fetch the interrupted run finished is never fetched again; the one in flight
    # at the interruption (one thread) may be
    images_hit = {path: n for path, n in http_server.hits.items() if path != "/robots.txt"}
    twice = {path: n for path, n in images_hit.items() if n != 1}
    assert len(images_hit) == 16 and len(twice) <= 1, twice
    assert not logged & {path.lstrip("/") for path in twice}, twice
    assert not (images / JOURNAL_DIR).exists()  # its bodies are in the finished shards

    again = tmp_path / "again"
    convert(
        "--docs",
        str(docs),
        "--images",
        str(tmp_path / "fresh"),
        "--download-images",
        "--out",
        str(again),
        "--no-progress",
    )
    assert outputs(again) == outputs(out) and len(outputs(out)) == 1


def test_retry_failed_fetches_only_those_reasons_and_writes_a_first_time_success(
    http_server: LocalServer, tmp_path: Path
) -> None:
    good = [serve_image(http_server, f"ok{i}.jpg", i) for i in range(3)]
    flaky, gone = http_server.url("flaky.jpg"), http_server.url("gone.jpg")
    http_server.routes["/flaky.jpg"] = Route(b"busy", "text/plain", status=503)
    documents = [document([good[0], flaky]), document([good[1], gone]), document([good[2]])]
    docs = write_docs(tmp_path / "docs_00000.jsonl", documents)
    out, images = tmp_path / "out", tmp_path / "downloads"
    args = [
        "--docs",
        str(docs),
        "--images",
        str(images),
        "--download-images",
        "--out",
        str(out),
        "--no-progress",
    ]
    convert(*args)
    first = json.loads((out / "stats.json").read_text())
    assert first["reasons"]["images"] == {"http_503": 1, "http_404": 1}

    serve_image(http_server, "flaky.jpg", 7)  # the server answers now, for both urls
    serve_image(http_server, "gone.jpg", 8)
    convert(*args, "--retry-failed", "http_5xx")
    assert http_server.hits["/flaky.jpg"] == 2 and http_server.hits["/gone.jpg"] == 1
    assert all(http_server.hits[f"/ok{i}.jpg"] == 1 for i in range(3))

    del http_server.routes["/gone.jpg"]  # the reference run: flaky answered the first time
    reference = tmp_path / "reference"
    convert(
        "--docs",
        str(docs),
        "--images",
        str(tmp_path / "ref-images"),
        "--download-images",
        "--out",
        str(reference),
        "--no-progress",
    )
    assert outputs(out) == outputs(reference)
    for name in ("stats.json", "sizes.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reasons"]["images"] == {"http_404": 1}

    # documents naming a url no attempt saw: refused, then fetched with `not_downloaded`
    new = serve_image(http_server, "new.jpg", 9)
    write_docs(docs, [*documents, document([new])])
    before = dict(http_server.hits)
    refused = convert(*args, "--resume", check=False)
    assert refused.returncode == 2 and "1 new" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    convert(*args, "--retry-failed", "not_downloaded")
    fetched = {p: n - before.get(p, 0) for p, n in http_server.hits.items() if n != before.get(p)}
    assert fetched == {"/new.jpg": 1, "/robots.txt": 1}  # robots.txt: once per download process
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"]["documents"] == {"in": 4, "written": 4}
    assert stats["counts"]["urls"] == {"in": 6, "fetched": 5, "rejected": 1}


@pytest.mark.parametrize("converter", ["mmc4", "obelics"])
def test_retry_failed_without_download_images_is_one_line(converter: str, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    command = cli(
        converter, "--docs", "x.jsonl", "--images", "d", "--out", out, "--retry-failed", "timeout"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--download-images" in done.stderr


def test_an_image_layout_other_than_url_is_refused_with_download(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs_00000.jsonl", [document(["http://127.0.0.1:9/x.jpg"])])
    done = convert(
        "--docs",
        str(docs),
        "--images",
        str(tmp_path / "d"),
        "--download-images",
        "--image-layout",
        "flat",
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert done.returncode == 2 and "layout" in done.stderr
