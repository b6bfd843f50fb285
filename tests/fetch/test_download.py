"""Fetching urls for img2dataset: a time limit per url in all, a size cap, http(s) redirects only.

img2dataset's own fetch (``urlopen(timeout).read()``) let a server that drips bytes hold a url far
past ``--timeout``, stored a body of any size, and followed redirects to ``ftp://``.
"""

from __future__ import annotations

import http.server
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from flamingo_data.demo.sample_data import make_image
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.fetch.web import TooManyBytes, fetch, request_url
from flamingo_data.run.executors import Execution
from tests.conftest import Route, work_kept

JPEG = make_image(3, 64, 48, "JPEG")
CAP = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    """/drip.jpg: a byte every 50 ms; /huge.jpg: a JPEG then 4 MiB, no Content-Length;
    /ftp.jpg: a redirect to ``ftp_target``; /ok.jpg: the JPEG."""

    ftp_target = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            if self.path == "/ftp.jpg":
                self.send_response(302)
                self.send_header("Location", self.ftp_target)
                self.end_headers()
                return
            self.send_response(200)
            if self.path == "/ok.jpg":
                self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            if self.path == "/drip.jpg":
                for i in range(len(JPEG)):
                    self.wfile.write(JPEG[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/huge.jpg":
                self.wfile.write(JPEG + b"\0" * (4 * CAP))
            else:
                self.wfile.write(JPEG)
        except OSError:  # the client hung up, as it should
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[int]]]:
    """(base url, connections the would-be FTP server got)."""
    ftp = socket.create_server(("127.0.0.1", 0))
    ftp_hits: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = ftp.accept()
            except OSError:
                return
            ftp_hits.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    handler = type("H", (_Handler,), {"ftp_target": f"ftp://127.0.0.1:{ftp.getsockname()[1]}/x"})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", ftp_hits
    httpd.shutdown()
    httpd.server_close()
    ftp.close()


def test_fetch_bounds_time_size_and_redirects(server) -> None:
    base, ftp_hits = server
    get = lambda path: fetch(f"{base}/{path}", timeout=1, max_bytes=CAP, headers={})  # noqa: E731
    assert get("ok.jpg") == JPEG
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):  # the JPEG alone would drip for 30+ s
        get("drip.jpg")
    assert time.monotonic() - start < 3
    with pytest.raises(TooManyBytes, match="over the download cap"):
        get("huge.jpg")
    with pytest.raises(OSError, match="non-http"):
        get("ftp.jpg")
    assert ftp_hits == []


def _drip_times_out(base: str) -> bool:
    try:
        fetch(f"{base}/drip.jpg", timeout=0.5, max_bytes=CAP, headers={})
    except TimeoutError:
        return True
    return False


def test_deadlines_share_one_watcher_thread_and_hold_in_a_forked_child(server, monkeypatch) -> None:
    """Many fetches start no thread each; a process forked after fetches still times out."""
    base, _ = server
    fetch(f"{base}/ok.jpg", timeout=5, max_bytes=CAP, headers={})
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        if thread.name != "fetch-deadlines" and "process_request" not in thread.name:
            started.append(thread.name)
        start(thread)

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", counted)
        for _ in range(30):
            assert fetch(f"{base}/ok.jpg", timeout=5, max_bytes=CAP, headers={}) == JPEG
    assert started == []
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_drip_times_out, (base,)).get(timeout=30)


def test_urls_with_spaces_and_non_ascii_text_are_fetched_as_a_browser_does(http_server) -> None:
    """urllib sent the url as given: ``é`` failed ('ascii' codec can't encode) and a space failed
    (control characters), so such LAION rows were lost though their images were there."""
    http_server.routes["/caf%C3%A9%20noir.jpg"] = Route(JPEG)
    http_server.routes["/a%20b.jpg"] = Route(b"already encoded")
    get = partial(fetch, timeout=2, max_bytes=CAP, headers={})
    assert get(http_server.url("café noir.jpg")) == JPEG
    assert get(http_server.url("a%20b.jpg")) == b"already encoded"  # an existing %XX stays
    assert get(http_server.url("caf%C3%A9%20noir.jpg?q=1 2")) == JPEG
    assert request_url("http://bücher.example/ä b?x=ü&y=%41") == (
        "http://xn--bcher-kva.example/%C3%A4%20b?x=%C3%BC&y=%41"
    )
    assert request_url("http://example.com/plain.jpg#frag") == "http://example.com/plain.jpg#frag"


@pytest.mark.slow
def test_chatgpt_download_counts_slow_huge_and_ftp_redirected_urls(server, tmp_path) -> None:
    """Through img2dataset's spawned workers: before, the dripping image took 30+ s and was
    embedded, the 4 MiB body was stored and embedded whole, and the redirect reached the FTP port."""
    from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
    from flamingo_data.run.units import RunOptions

    base, ftp_hits = server
    names = ("ok", "drip", "huge", "ftp")
    sequences = [
        {"example": f"{n} _!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {"url": f"{base}/{n}.jpg"}}}
        for n in names
    ]
    (tmp_path / "s.json").write_text(json.dumps(sequences))
    download = DownloadOptions(threads=4, timeout=1, retries=0, max_bytes=CAP)
    start = time.monotonic()
    with work_kept():  # the downloads, whose size is checked below
        stats = convert_chatgpt(
            str(tmp_path / "s.json"),
            ChatGptOptions(download=download),
            RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
            execution=Execution(processes=1, progress=False),
        ).to_json()
    assert time.monotonic() - start < 25
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["images"] == {"timeout": 1, "too_many_bytes": 1, "bad_url": 1}
    assert ftp_hits == []
    assert (
        sum(p.stat().st_size for p in Path(tmp_path / "out" / "_work" / "_images").glob("*.tar"))
        < CAP
    )


NO_NETWORK = """
import socket, sys
def refuse(*args, **kwargs):
    sys.stderr.write(f"NETWORK {args[:2]!r}\\n")
    raise OSError("no network here")
socket.create_connection = refuse
socket.socket.connect = lambda self, address: refuse(address)
import flamingo_data.fetch.i2d_worker
print("imported")
"""


def test_importing_the_img2dataset_hook_contacts_no_server() -> None:
    """albumentations, which img2dataset imports, asks PyPI for a newer version on import unless
    NO_ALBUMENTATIONS_UPDATE is set: the module that imports img2dataset sets it first."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "imported", result.stderr[-1000:]
    assert "NETWORK" not in result.stderr


def test_robots_txt_is_fetched_once_per_site_and_obeyed(http_server) -> None:
    """Disallowed paths are refused unfetched; a robots.txt answered 4xx allows everything; one
    that cannot be fetched refuses the site's urls with its own reason (RFC 9309)."""
    pytest.importorskip("img2dataset")
    from flamingo_data.fetch.i2d_output import failure_reason
    from flamingo_data.fetch.i2d_worker import OptedOut, RobotsRules, RobotsUnreachable

    http_server.routes["/robots.txt"] = Route(b"User-agent: *\nDisallow: /private/\n", "text/plain")
    rules = RobotsRules()
    rules.check(http_server.url("public/a.jpg"), "img2dataset", "agent", 5)
    for _ in range(3):
        with pytest.raises(OptedOut) as refused:
            rules.check(http_server.url("private/b.jpg"), "img2dataset", "agent", 5)
    assert failure_reason(str(refused.value), "failed") == "opted_out"
    assert http_server.hits == {"/robots.txt": 1}

    http_server.routes["/robots.txt"] = Route(b"busy", "text/plain", status=503)
    with pytest.raises(RobotsUnreachable) as unreachable:
        RobotsRules().check(http_server.url("public/a.jpg"), "img2dataset", "agent", 5)
    assert failure_reason(str(unreachable.value), "failed") == "robots_unreachable"

    del http_server.routes["/robots.txt"]  # a 404: no rules
    RobotsRules().check(http_server.url("private/b.jpg"), "img2dataset", "agent", 5)
