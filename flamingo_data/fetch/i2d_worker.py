"""img2dataset's shard downloader, fetching with ``flamingo_data.fetch.web.fetch`` (a time limit per
url in all, a size cap, http(s)-only redirects) instead of its own unbounded ``urlopen().read()``.

Imported only when a download starts (it imports img2dataset). img2dataset pickles the downloader
into its spawned worker processes; each worker swaps its module's ``download_image`` for ours on
the first shard it is given, so nothing changes in any process that is not an img2dataset worker.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import urllib.error
import urllib.parse
import urllib.robotparser
from collections.abc import Iterator
from functools import partial
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

# albumentations, which img2dataset imports, asks PyPI for a newer version unless told not to
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset import downloader as i2d  # noqa: E402 (after the line above)
from img2dataset.logger import LoggerProcess  # noqa: E402

from flamingo_data.fetch.journal import Journal, logged_body  # noqa: E402
from flamingo_data.fetch.web import USER_AGENT, fetch, is_web_url, request_url  # noqa: E402
from flamingo_data.run.procpool import die_with_parent  # noqa: E402

UPSTREAM_WITH_RETRY = i2d.download_image_with_retry
_JOURNALS: dict[str, Journal] = {}  # this process's journal, by folder


class BoundedDownloader(i2d.Downloader):
    """img2dataset's Downloader whose every fetch is bounded by ``--timeout`` and ``max_bytes``;
    with a ``journal`` folder, each url's final outcome is logged there and a url logged by an
    interrupted run is answered from the log (see ``flamingo_data.fetch.journal``)."""

    def __init__(
        self, *args: Any, max_bytes: int, journal: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        self.journal = journal

    def __call__(self, row: Any) -> Any:
        i2d.download_image = partial(download_image, max_bytes=self.max_bytes)
        if self.journal is not None:
            if self.journal not in _JOURNALS:
                _JOURNALS[self.journal] = Journal.open(self.journal)
            i2d.download_image_with_retry = partial(
                journaled_download, journal=_JOURNALS[self.journal]
            )
        return super().__call__(row)


def journaled_download(row: tuple[int, str], *args: Any, journal: Journal, **kwargs: Any) -> Any:
    """img2dataset's ``download_image_with_retry``, answered from ``journal`` for a url it holds;
    otherwise fetched (with img2dataset's retries) and its outcome logged."""
    key, url = row
    if (logged := journal.lookup(url)) is not None:
        if logged.error is not None:
            return key, None, logged.error
        return key, io.BytesIO(logged_body(logged)), None
    key, stream, error = UPSTREAM_WITH_RETRY(row, *args, **kwargs)
    if stream is None:
        journal.record(url, None, str(error or "failed"))
    else:
        journal.record(url, stream.getvalue(), None)
    return key, stream, error


@contextlib.contextmanager
def _ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile: a process started here inherits the blocked mask
    through exec, and a Ctrl-C that arrives meanwhile stays pending for this process."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _TiedToItsParent:
    """A spawned process that never receives Ctrl-C, from its first instruction (its parent stops
    the download and terminates it), and that ends when its parent dies (``die_with_parent``)."""

    def start(self) -> None:
        with _ctrl_c_blocked():
            super().start()  # type: ignore[misc]


class TiedLoggerProcess(_TiedToItsParent, LoggerProcess):
    """img2dataset's progress logger, which polls its stats files until told to stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parent_pid = os.getpid()

    def run(self) -> None:
        die_with_parent(self.parent_pid)
        super().run()


class TiedSpawnProcess(_TiedToItsParent, SpawnProcess):
    """img2dataset's pool workers."""


class TiedSpawnContext(SpawnContext):
    """The ``spawn`` context img2dataset's multiprocessing distributor builds its pool from: its
    workers are ``TiedSpawnProcess`` and run ``die_with_parent`` first."""

    Process = TiedSpawnProcess

    def Pool(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 (multiprocessing's name)
        return super().Pool(*args, initializer=die_with_parent, initargs=(os.getpid(),), **kwargs)


def tied_spawn_context(method: str | None = None) -> SpawnContext:
    """Stands in for ``multiprocessing.get_context`` in img2dataset's distributor (it asks for
    ``spawn``)."""
    return TiedSpawnContext()


def download_image(
    row: tuple[int, str],
    timeout: float,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    *,
    max_bytes: int,
) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's ``download_image`` contract: (key, bytes, None) or (key, None, its message)."""
    key, url = row
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    check = partial(_opt_out, token=user_agent_token, directives=disallowed_header_directives)
    try:
        if user_agent_token:
            ROBOTS.check(url, user_agent_token, agent, timeout)
        body = fetch(
            url, timeout=timeout, max_bytes=max_bytes, headers={"User-Agent": agent}, check=check
        )
    except Exception as exc:  # noqa: BLE001 (every failure is the row's message, as upstream)
        return key, None, str(exc)
    return key, io.BytesIO(body), None


class OptedOut(ValueError):
    """The site's X-Robots-Tag or robots.txt asks that its images not be used."""


ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to read at least 500 KiB of a robots.txt


class RobotsRules:
    """Each site's robots.txt, fetched once per process (bounded like an image) and obeyed:
    a path it disallows for the user agent token is refused unfetched. A robots.txt answered with
    a 4xx allows everything; one that cannot be fetched (5xx, timeout) refuses the site's urls
    (RFC 9309), with a reason ``--retry-failed`` can name."""

    def __init__(self) -> None:
        self.rules: dict[str, urllib.robotparser.RobotFileParser | str | None] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def check(self, url: str, token: str, agent: str, timeout: float) -> None:
        """Raise OptedOut (or RobotsUnreachable) unless the site's robots.txt lets ``token`` fetch."""
        if not is_web_url(url):
            return  # never fetched: ``fetch`` refuses it (bad_url)
        parts = urllib.parse.urlsplit(request_url(url))
        if not parts.hostname:
            return  # no host: ``fetch`` refuses it (bad_url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        with self.guard:
            lock = self.locks.setdefault(origin, threading.Lock())
        with lock:
            if origin not in self.rules:
                self.rules[origin] = _robots_rules(origin, agent, timeout)
        rules = self.rules[origin]
        if isinstance(rules, str):
            raise RobotsUnreachable(rules)
        if rules is not None and not rules.can_fetch(token, request_url(url)):
            raise OptedOut("Use of image disallowed by robots.txt")


class RobotsUnreachable(OSError):
    """The site's robots.txt could not be fetched: its urls are not fetched either."""


def _robots_rules(
    origin: str, agent: str, timeout: float
) -> urllib.robotparser.RobotFileParser | str | None:
    """The parsed rules, None (no rules: a 4xx), or why they could not be fetched."""
    try:
        body = fetch(
            f"{origin}/robots.txt",
            timeout=timeout,
            max_bytes=ROBOTS_MAX_BYTES,
            headers={"User-Agent": agent},
        )
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500:
            return None
        return f"robots.txt unreachable: HTTP Error {exc.code}"
    except Exception as exc:  # noqa: BLE001 (any failure: the site's urls are refused, counted)
        return f"robots.txt unreachable: {exc}"
    rules = urllib.robotparser.RobotFileParser()
    rules.parse(body.decode("utf-8", "replace").splitlines())
    return rules


ROBOTS = RobotsRules()


def _opt_out(response: Any, token: str | None, directives: set[str] | None) -> None:
    if directives and i2d.is_disallowed(response.headers, token, directives):
        raise OptedOut("Use of image disallowed by X-Robots-Tag directive")  # upstream's message
