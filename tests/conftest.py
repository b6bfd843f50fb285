"""Shared fixtures: real image bytes and a real HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from flamingo_data.demo.sample_data import make_image


@dataclass
class Route:
    """What the test server answers for one path."""

    body: bytes = b""
    content_type: str = "image/jpeg"
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # e.g. X-Robots-Tag, Location


@dataclass
class LocalServer:
    """A threaded HTTP server on 127.0.0.1; ``routes`` may be changed while it runs."""

    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def add_image(
        self, path: str, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (96, 72)
    ) -> bytes:
        body = make_image(seed, *size, fmt=fmt)
        self.routes["/" + path.lstrip("/")] = Route(body, f"image/{fmt.lower()}")
        return body


def _handler(server: LocalServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            server.hits[path] = server.hits.get(path, 0) + 1
            route = server.routes.get(path, Route(b"not found", "text/plain", 404))
            if route.delay_s:
                time.sleep(route.delay_s)
            try:
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args) -> None:
            pass

    return Handler


def serve() -> Iterator[LocalServer]:
    """Run a real local HTTP server until the generator is closed."""
    state = LocalServer("127.0.0.1", 0)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    """A real local HTTP server; tests add routes (images, 404s, HTML, stalls)."""
    yield from serve()


@pytest.fixture
def jpeg_bytes() -> bytes:
    return make_image(1, 64, 48, "JPEG")


@pytest.fixture
def png_bytes() -> bytes:
    return make_image(2, 64, 48, "PNG")


@contextlib.contextmanager
def work_kept() -> Iterator[None]:
    """Runs inside keep their work folder (``_work/``: img2dataset's own output among it) at the
    end, for tests that adopt a real download: the driver's clean-up is held back."""
    from flamingo_data.run import driver

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "drop_work", lambda out_dir: None)
        yield
