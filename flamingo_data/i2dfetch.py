"""img2dataset's shard downloader, fetching with ``flamingo_data.download.fetch`` (a time limit per
url in all, a size cap, http(s)-only redirects) instead of its own unbounded ``urlopen().read()``.

Imported only when a download starts (it imports img2dataset). img2dataset pickles the downloader
into its spawned worker processes; each worker swaps its module's ``download_image`` for ours on
the first shard it is given, so nothing changes in any process that is not an img2dataset worker.
"""

from __future__ import annotations

import io
import signal
from functools import partial
from typing import Any

from img2dataset import downloader as i2d
from img2dataset.logger import LoggerProcess

from flamingo_data.download import USER_AGENT, fetch


class BoundedDownloader(i2d.Downloader):
    """img2dataset's Downloader whose every fetch is bounded by ``--timeout`` and ``max_bytes``."""

    def __init__(self, *args: Any, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes

    def __call__(self, row: Any) -> Any:
        i2d.download_image = partial(download_image, max_bytes=self.max_bytes)
        _leave_interrupts_to_the_parent()
        return super().__call__(row)


class QuietLoggerProcess(LoggerProcess):
    """img2dataset's progress logger, leaving Ctrl-C to the process that started it (which stops
    it), instead of printing a traceback of its own."""

    def run(self) -> None:
        _leave_interrupts_to_the_parent()
        super().run()


def _leave_interrupts_to_the_parent() -> None:
    """Ctrl-C reaches every process of the terminal's group: a worker ignores it, and the parent
    stops the download (raising ``KeyboardInterrupt``) and terminates the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        body = fetch(
            url, timeout=timeout, max_bytes=max_bytes, headers={"User-Agent": agent}, check=check
        )
    except Exception as exc:  # noqa: BLE001 (every failure is the row's message, as upstream)
        return key, None, str(exc)
    return key, io.BytesIO(body), None


class OptedOut(ValueError):
    """The site's X-Robots-Tag asks that its images not be used."""


def _opt_out(response: Any, token: str | None, directives: set[str] | None) -> None:
    if directives and i2d.is_disallowed(response.headers, token, directives):
        raise OptedOut("Use of image disallowed by X-Robots-Tag directive")  # upstream's message
