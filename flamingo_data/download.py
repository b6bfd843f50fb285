"""img2dataset as a library: Flamingo-ready settings, no telemetry, bounded timeouts, incremental resume.

img2dataset spawns processes, so its caller needs an ``if __name__ == "__main__":`` guard (the CLI has
one). Its own fetch (``urlopen`` + ``read()``) has no size cap, a timeout per socket read only (a
server that drips a byte a second holds a url forever) and follows redirects to ``ftp://``; its
workers fetch with ``fetch`` instead (see ``flamingo_data.i2dfetch``). albumentations, imported by
img2dataset, calls PyPI on import unless told not to: we tell it, and import img2dataset only when
a download really starts. Ray is never started: the ``multiprocessing``
distributor runs everything on this machine.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from flamingo_data.errors import MissingExtra
from flamingo_data.extras import require_extra
from flamingo_data.images import DEFAULT_MAX_PIXELS

# Directives with which a site asks that its images not be used for AI training or indexing.
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
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


@dataclass(frozen=True)
class DownloadOptions:
    """How img2dataset fetches: sizes, parallelism, bounded timeouts/retries, pixel cap, opt-outs."""

    image_size: int = 256
    resize_mode: str = "keep_ratio_largest"
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 1
    min_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    samples_per_shard: int = 10_000
    keep_original_bytes: bool = False
    respect_opt_out: bool = True
    max_bytes: int = MAX_DOWNLOAD_BYTES  # a bigger body is refused (too_many_bytes)


@dataclass
class _Deadline:
    """Shuts down every socket of one fetch when its time is up, whatever read it is blocked in."""

    sockets: list[socket.socket] = field(default_factory=list)
    expired: bool = False

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
    timer = threading.Timer(timeout, deadline.expire)
    timer.daemon = True
    timer.start()
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
        timer.cancel()
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


def run_img2dataset(
    url_list: str,
    output: str,
    *,
    url_col: str,
    caption_col: str | None,
    options: DownloadOptions,
    extra_columns: list[str] | None = None,
    input_format: str = "parquet",
) -> None:
    """Download into ``output`` (webdataset jpg/txt/json); finished shards are skipped on a rerun.
    Without the [download] extra raises MissingExtra."""
    require_extra("download", "run_img2dataset")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    with _bounded_fetch(options.max_bytes), _interrupt_raises():
        download(
            url_list=url_list,
            input_format=input_format,
            url_col=url_col,
            caption_col=caption_col,
            save_additional_columns=extra_columns or None,
            output_format="webdataset",
            output_folder=output,
            processes_count=options.processes,
            thread_count=options.threads,
            image_size=options.image_size,
            resize_mode="no" if options.keep_original_bytes else options.resize_mode,
            resize_only_if_bigger=True,
            disable_all_reencoding=options.keep_original_bytes,
            timeout=options.timeout,
            retries=options.retries,
            enable_wandb=False,
            number_sample_per_shard=options.samples_per_shard,
            min_image_size=options.min_size,
            max_image_area=options.max_pixels,
            compute_hash=None,
            incremental_mode="incremental",
            distributor="multiprocessing",
            user_agent_token="img2dataset" if options.respect_opt_out else None,
            disallowed_header_directives=OPT_OUT_DIRECTIVES if options.respect_opt_out else None,
        )


@contextlib.contextmanager
def _bounded_fetch(max_bytes: int) -> Iterator[None]:
    """img2dataset builds its downloader by the name ``Downloader`` in its ``main``: ours while
    the download runs (its workers then fetch with ``fetch``), upstream's again afterwards."""
    from flamingo_data.i2dfetch import BoundedDownloader, TiedLoggerProcess, tied_spawn_context

    i2d_main = importlib.import_module("img2dataset.main")  # the package's ``main`` is a function
    i2d_downloader = importlib.import_module("img2dataset.downloader")
    i2d_distributor = importlib.import_module("img2dataset.distributor")
    if not all(
        hasattr(m, n) for m, n in ((i2d_main, "Downloader"), (i2d_downloader, "download_image"))
    ):
        raise MissingExtra(  # an img2dataset outside the tested range: never fetch unbounded silently
            "a bounded download (img2dataset.main.Downloader, downloader.download_image)",
            "img2dataset>=1.47,<1.48",
            "download",
        )
    upstream = i2d_main.Downloader, i2d_main.LoggerProcess, i2d_distributor.get_context
    i2d_main.Downloader = partial(BoundedDownloader, max_bytes=max_bytes)
    # its spawned processes leave Ctrl-C to this one and die with it (see flamingo_data.i2dfetch)
    i2d_main.LoggerProcess = TiedLoggerProcess
    i2d_distributor.get_context = tied_spawn_context
    try:
        yield
    finally:
        i2d_main.Downloader, i2d_main.LoggerProcess, i2d_distributor.get_context = upstream


class _InterruptingSignals:
    """What img2dataset's ``main`` sees as the ``signal`` module: a SIGINT handler it installs runs
    its clean-up (temporary folder, logger process) and then raises ``KeyboardInterrupt`` where
    upstream calls ``sys.exit(0)``, so an interrupted download is never a successful run."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    @staticmethod
    def signal(signum: int, handler: Any) -> Any:
        if signum != signal.SIGINT or not callable(handler):
            return signal.signal(signum, handler)

        def clean_up_then_interrupt(number: int, frame: Any) -> None:
            with contextlib.suppress(SystemExit):
                handler(number, frame)
            raise KeyboardInterrupt

        return signal.signal(signum, clean_up_then_interrupt)


@contextlib.contextmanager
def _interrupt_raises() -> Iterator[None]:
    """While img2dataset runs, Ctrl-C raises ``KeyboardInterrupt`` (see ``_InterruptingSignals``);
    afterwards the caller's own SIGINT handler is back (upstream leaves its handler installed)."""
    i2d_main = importlib.import_module("img2dataset.main")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    i2d_main.signal = _InterruptingSignals()
    try:
        yield
    finally:
        i2d_main.signal = signal
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
