"""A local web site of image urls that looks like what a crawl meets, for the download benchmark.

Images are web-like bytes (``weblike.web_image``: baseline/progressive JPEG, PNG, grey, CMYK,
EXIF-rotated, 300-1,200 px, ~1% cut off, ~2% missing = 404) and beside them the urls' own failures:
404 pages, 500s, an HTML page where an image was linked, permanent redirects to the image, images
whose server opts out of AI use (``X-Robots-Tag: noai``), and optionally slow urls that answer only
after a delay. MMC4 documents reference the urls ~3 to a document, and a few urls (logos, banners)
are shared by several documents. The urls are spread over many sites (a port each, all on 127.0.0.1
only), each with its robots.txt: rules that allow the images, none (404), a few that disallow the
``img2dataset`` token, a few unreachable (503).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import selectors
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from photos import load_photos
from weblike import MIX, web_image

from flamingo_data.demo.sample_data import make_document

# (kind of url, share of the distinct urls); "image" draws from weblike's MIX
URL_MIX = (
    ("image", 0.85),
    ("not_found", 0.07),
    ("redirect", 0.03),
    ("server_error", 0.02),
    ("html", 0.02),
    ("opted_out", 0.01),
)
HTML = b"<!doctype html><html><head><title>Photo gallery</title></head><body>" + b"<p>x</p>" * 400
# (robots.txt of a site, share of the sites)
ROBOTS_MIX = (
    ("rules", 0.60),
    ("none", 0.35),
    ("disallows_img2dataset", 0.03),
    ("unreachable", 0.02),
)
SHARED_SHARE = 0.01  # of the urls, each referenced by several documents
DOCS_WITH_SHARED = 0.15  # of the documents, each with one extra shared url


@dataclass(frozen=True)
class Page:
    status: int
    body: bytes = b""
    content_type: str = "image/jpeg"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0


ROBOTS_PAGES = {
    "rules": Page(200, b"User-agent: *\nDisallow: /private/\nDisallow: /cgi-bin/\n", "text/plain"),
    "none": Page(404, b"Not Found", "text/html"),
    "disallows_img2dataset": Page(
        200, b"User-agent: img2dataset\nDisallow: /\n\nUser-agent: *\nAllow: /\n", "text/plain"
    ),
    "unreachable": Page(503, b"Service Unavailable", "text/html"),
}
# how a url of each kind ends when it is fetched: stored, or failed with this reason
FAILS_AS = {
    "image_missing": "http_404",
    "not_found": "http_404",
    "server_error": "http_500",
    "opted_out": "opted_out",
    "slow": "timeout",
}
# how every url of a site ends for a tool that reads robots.txt, whatever its kind
ROBOTS_FAIL_AS = {"disallows_img2dataset": "opted_out", "unreachable": "robots_unreachable"}


@dataclass
class Site:
    """Pages by path (any site serves any path; each has its own robots.txt), the distinct url
    paths in document order, each path's kind and site, and each site's robots.txt kind."""

    robots: list[str]
    pages: dict[str, Page] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    kind_of: dict[str, str] = field(default_factory=dict)
    site_of: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, page: Page, kind: str, site: int, listed: bool = True) -> None:
        self.pages[path] = page
        if listed:
            self.paths.append(path)
            self.kinds[kind] += 1
            self.kind_of[path] = kind
            self.site_of[path] = site

    def expected(self, reads_robots: bool) -> dict:
        """What a download of every url stores (distinct urls) and refuses, by reason."""
        failed: Counter = Counter()
        for path, kind in self.kind_of.items():
            robots = self.robots[self.site_of[path]]
            if reads_robots and robots in ROBOTS_FAIL_AS:
                failed[ROBOTS_FAIL_AS[robots]] += 1
            elif kind in FAILS_AS:
                failed[FAILS_AS[kind]] += 1
        return {
            "images": len(self.kind_of) - sum(failed.values()),
            "failed": dict(failed.most_common()),
        }


def image_pool(count: int, rng: np.random.Generator) -> list[tuple[str, bytes | None]]:
    """``count`` web-like images as (weblike kind, bytes or None for a missing file)."""
    photos = load_photos()
    kinds, shares = zip(*MIX, strict=True)
    pool = []
    for _ in range(count):
        kind = str(rng.choice(kinds, p=shares))
        pool.append((kind, web_image(kind, photos[int(rng.integers(len(photos)))], rng)))
    return pool


def image_page(kind: str, data: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Page:
    png = kind.startswith("png")
    return Page(200, data, "image/png" if png else "image/jpeg", headers)


def build_site(
    urls: int, distinct_images: int, slow: int, slow_seconds: float, sites: int, seed: int = 0
) -> Site:
    """``urls`` distinct urls drawn from ``URL_MIX`` (their images from a pool of
    ``distinct_images``) over ``sites`` sites, plus ``slow`` urls that answer after
    ``slow_seconds``, spread evenly."""
    rng = np.random.default_rng(seed)
    pool = image_pool(min(urls, distinct_images), rng)
    kinds, shares = zip(*URL_MIX, strict=True)
    robots, robots_shares = zip(*ROBOTS_MIX, strict=True)
    site = Site([str(rng.choice(robots, p=robots_shares)) for _ in range(sites)])
    slow_at = {int(i) for i in np.linspace(0, urls, slow + 2)[1:-1]} if slow else set()
    for n in range(urls):
        host = int(rng.integers(sites))
        if n in slow_at:
            page = Page(200, pool[0][1] or b"", delay=slow_seconds)
            site.add(f"/img/{n:06d}-slow.jpg", page, "slow", host)
        kind = str(rng.choice(kinds, p=shares))
        image_kind, data = pool[n if urls <= len(pool) else int(rng.integers(len(pool)))]
        path = f"/img/{n:06d}.{'png' if image_kind.startswith('png') else 'jpg'}"
        if kind == "image" and data is None:
            site.add(path, Page(404, b"Not Found", "text/html"), "image_missing", host)
        elif kind == "image":
            site.add(path, image_page(image_kind, data), f"image_{image_kind}", host)
        elif kind == "not_found":
            site.add(path, Page(404, b"Not Found", "text/html"), kind, host)
        elif kind == "server_error":
            site.add(path, Page(500, b"Internal Server Error", "text/html"), kind, host)
        elif kind == "html":
            site.add(path, Page(200, HTML, "text/html; charset=utf-8"), kind, host)
        elif kind == "opted_out":
            page = image_page(image_kind, data or HTML, (("X-Robots-Tag", "noai"),))
            site.add(path, page, kind, host)
        else:  # a redirect to where the image moved, on the same site
            moved = f"/moved/{n:06d}.jpg"
            site.add(path, Page(301, b"", "text/html", (("Location", moved),)), kind, host)
            site.add(moved, image_page(image_kind, data or HTML), kind, host, listed=False)
    return site


def document_urls(paths: list[str], rng: np.random.Generator) -> list[list[str]]:
    """The url paths of each document: 1-5 distinct ones in order (3 on average), and in
    ``DOCS_WITH_SHARED`` of the documents one more from the first ``SHARED_SHARE`` of the urls."""
    shared = paths[: max(1, int(len(paths) * SHARED_SHARE))]
    docs, start = [], 0
    while start < len(paths):
        size = int(rng.integers(1, 6))
        doc = paths[start : start + size]
        start += size
        extra = shared[int(rng.integers(len(shared)))]
        if rng.random() < DOCS_WITH_SHARED and extra not in doc:
            doc = [*doc, extra]
        docs.append(doc)
    return docs


def write_documents(path: Path, base_urls: list[str], site: Site, seed: int = 0) -> list[str]:
    """MMC4 jsonl documents naming the urls (each path at its site's base url); returns every image
    reference's url in document order (shared urls once per document that names them)."""
    rng = np.random.default_rng(seed + 1)
    references: list[str] = []
    with path.open("w") as out:
        for n, doc_paths in enumerate(document_urls(site.paths, rng)):
            doc = make_document(rng, f"dl{n}", int(rng.integers(3, 8)), len(doc_paths))
            for info, url_path in zip(doc["image_info"], doc_paths, strict=True):
                info["raw_url"] = base_urls[site.site_of[url_path]] + url_path
                references.append(info["raw_url"])
            out.write(json.dumps(doc) + "\n")
    return references


@dataclass
class Hit:
    """One request the site got: its path, when it arrived and when it was answered (a delayed
    page, which the client gives up on, counts as answered on arrival)."""

    path: str
    arrived: float
    answered: float


class _Handler(http.server.BaseHTTPRequestHandler):
    site: Site
    robots: Page
    hits: list[Hit]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        arrived = time.perf_counter()
        hit = Hit(self.path, arrived, arrived)
        self.hits.append(hit)  # on arrival: a run's requests are all listed once it has ended
        page = (
            self.robots
            if self.path == "/robots.txt"
            else self.site.pages.get(self.path, Page(404, b"Not Found", "text/html"))
        )
        self.answer(page)
        if not page.delay:
            hit.answered = time.perf_counter()

    def answer(self, page: Page) -> None:
        try:
            if page.delay:
                time.sleep(page.delay)
            self.send_response(page.status)
            self.send_header("Content-Type", page.content_type)
            self.send_header("Content-Length", str(len(page.body)))
            for name, value in page.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(page.body)
        except OSError:  # the client gave up (a timeout): nothing to answer
            pass

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # img2dataset's threads connect at once


@contextlib.contextmanager
def serve(site: Site) -> Iterator[tuple[list[str], list[Hit]]]:
    """Every site on a free port of 127.0.0.1, one thread accepting for all: (each site's base
    url, the requests answered so far)."""
    hits: list[Hit] = []
    servers = [
        _Server(
            ("127.0.0.1", 0),
            type(
                "Handler", (_Handler,), {"site": site, "robots": ROBOTS_PAGES[robots], "hits": hits}
            ),
        )
        for robots in site.robots
    ]
    stop = threading.Event()

    def accept() -> None:
        with selectors.DefaultSelector() as selector:
            for server in servers:
                selector.register(server, selectors.EVENT_READ, server)
            while not stop.is_set():
                for key, _ in selector.select(0.2):
                    key.data._handle_request_noblock()  # serve_forever's step, for many servers

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield [f"http://127.0.0.1:{server.server_address[1]}" for server in servers], hits
    finally:
        stop.set()
        thread.join()
        for server in servers:
            server.server_close()
