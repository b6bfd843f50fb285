"""Bounded http(s) fetches: only http and https, a time limit per url in all, a size cap,
redirects to http(s) only, urls percent-encoded as a browser sends them."""

from __future__ import annotations

import contextlib
import heapq
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# A response body over this many bytes is refused: no image a model is trained on comes near it.
MAX_DOWNLOAD_BYTES = 64 * 2**20
# What a url keeps as is when it is percent-encoded for the request: reserved characters and "%".
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


WEB_SCHEMES = ("http", "https")


def is_web_url(url: Any) -> bool:
    """Only http(s) is fetched: urllib would also read ``file://``, ``ftp://`` and ``data:`` urls,
    so a crafted dataset could copy the converting machine's own files into shards. Anything but a
    text starting with ``http://`` or ``https://`` (any case, nothing before it) is refused."""
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


class RefusedUrl(ValueError):
    """A url that is not http(s): never requested. Its text names the reason ``bad_url`` maps from."""


def require_web_url(url: Any) -> None:
    """Raise ``RefusedUrl`` unless ``url`` is an http(s) url (``is_web_url``)."""
    if not is_web_url(url):
        shown = repr(url)[:200]
        raise RefusedUrl(f"refused a non-http(s) url {shown}: only http and https are fetched")


def request_url(url: str) -> str:
    """``url`` as a browser requests it: spaces, other control characters and non-ASCII text
    percent-encoded (UTF-8), a non-ASCII host in IDNA form; ``%XX`` already there stays. urllib
    sends the url as given, so a web url with ``é`` or a space failed (``'ascii' codec can't
    encode``, ``URL can't contain control characters``) though the image was there."""
    if not isinstance(url, str) or (url.isascii() and url.isprintable() and " " not in url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii():
        with contextlib.suppress(UnicodeError):  # not a valid name: the request fails, says why
            netloc = netloc.encode("idna").decode("ascii")
    path, query = (quote(part, safe=URL_SAFE) for part in (parts.path, parts.query))
    return urlunsplit((parts.scheme, netloc, path, query, ""))


@dataclass
class _Deadline:
    """Shuts down every socket of one fetch when its time is up, whatever read it is blocked in."""

    sockets: list[socket.socket] = field(default_factory=list)
    expired: bool = False
    done: bool = False  # the fetch ended: its deadline is moot

    def watch(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.expired:
            self.expire()

    def expire(self) -> None:
        self.expired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # already closed
                # the plain socket's shutdown, TLS too: it wakes a blocked read at once
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Deadlines:
    """One watcher thread per process expires every fetch's deadline at its time (a timer thread
    per fetch costs more CPU than the fetch of a small image)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # the parent's watcher is not in the child

    def reset(self) -> None:
        self.pending: list[tuple[float, int, _Deadline]] = []
        self.ready = threading.Condition()
        self.owner: int | None = None  # the process whose watcher runs

    def add(self, when: float, deadline: _Deadline) -> None:
        with self.ready:
            if self.owner != os.getpid():
                self.owner, self.pending = os.getpid(), []
                threading.Thread(target=self._watch, daemon=True, name="fetch-deadlines").start()
            heapq.heappush(self.pending, (when, id(deadline), deadline))
            self.ready.notify()

    def _watch(self) -> None:
        while True:
            with self.ready:
                while not self.pending or self.pending[0][0] > time.monotonic():
                    wait = self.pending[0][0] - time.monotonic() if self.pending else None
                    self.ready.wait(wait)
                _, _, deadline = heapq.heappop(self.pending)
            if not deadline.done:
                deadline.expire()


DEADLINES = _Deadlines()


class _Watched:
    """Connection mixin: once connected, the socket is shut down at its fetch's deadline."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._deadline.watch(self.sock)  # type: ignore[attr-defined]


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTP, req, deadline=self.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_WatchedHTTPS, req, context=self._context, deadline=self.deadline)


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect to ``ftp://`` or ``file://`` too: a crafted site could point it
    anywhere; only an http(s) target is followed."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 (urllib's hook)
        target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        if not is_web_url(target):
            fp.close()
            raise urllib.error.URLError(f"refused redirect to a non-http(s) url {target[:200]}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def fetch(
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    headers: dict[str, str],
    check: Callable[[Any], None] = lambda response: None,
) -> bytes:
    """The body of ``url``, or an exception whose text says why: ``timeout`` seconds in all
    (connect, redirects, headers, body: a slow-drip server is cut off), at most ``max_bytes``,
    http(s) redirects only; ``url`` is percent-encoded as a browser does (``request_url``).
    ``check(response)`` may refuse it from its headers before the body."""
    deadline = _Deadline()
    DEADLINES.add(time.monotonic() + timeout, deadline)
    try:
        require_web_url(url)
        opener = web_only_opener(deadline)
        request = urllib.request.Request(request_url(url), headers=headers)
        with opener.open(request, timeout=timeout) as response:
            check(response)
            body = _read_capped(response, max_bytes)
    except (OSError, http.client.HTTPException) as exc:
        if deadline.expired:
            raise TimeoutError(f"download timed out after {timeout} s") from exc
        raise
    finally:
        deadline.done = True
    if deadline.expired:  # a read cut short by the deadline can end without an error
        raise TimeoutError(f"download timed out after {timeout} s")
    return body


def web_only_opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """An opener with http and https handlers only: ``build_opener`` would add urllib's file, ftp
    and data handlers, which read local files and other schemes whatever the caller checked."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _HTTPHandler(deadline),
        _HTTPSHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        _WebOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),  # any other scheme: URLError "unknown url type"
    ):
        opener.add_handler(handler)
    return opener


def _read_capped(response: Any, max_bytes: int) -> bytes:
    """The whole body, refused as soon as it is known to be over ``max_bytes``."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooManyBytes(f"response of {declared} bytes is over the download cap ({max_bytes})")
    body = bytearray()
    while chunk := response.read(1 << 16):
        body += chunk
        if len(body) > max_bytes:
            raise TooManyBytes(f"response is over the download cap ({max_bytes} bytes)")
    return bytes(body)


class TooManyBytes(ValueError):
    """A response body over the download cap."""
