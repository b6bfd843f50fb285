"""The download step of a document converter whose images are urls (MMC4 ``download``, OBELICS).

Before the units run, every distinct http(s) url the documents name is fetched into the url-image
folder (``flamingo_data.fetch.url_images``). With ``retry_failed``, only the urls an earlier run
failed with those reasons are fetched again, and the units whose documents name one of them are
redone, so the output is what a run in which those urls had succeeded the first time writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError
from flamingo_data.fetch.url_images import UrlImages, fetch_url_images, url_store
from flamingo_data.fetch.web import is_web_url
from flamingo_data.run.units import RunOptions, Unit, discard_partial

UrlsOf = Callable[[Unit], Iterable[str]]  # the image urls one unit's documents name


@dataclass(frozen=True)
class DownloadStep:
    """The ``before`` step of a ConversionPlan: fetch, redo retried units, count urls."""

    units: list[Unit]
    urls_of: UrlsOf
    source: UrlImages
    counts: Stats  # the plan's input counts: ``urls`` is added here

    def __call__(self, run: RunOptions, overwrite: bool) -> None:
        if self.source.retry_failed and not run.resume:
            raise InputError(
                "`retry_failed` reruns an earlier run into the same folder: set `resume`"
            )
        urls = self.web_urls()
        if self.source.download is not None:
            again = fetch_url_images(urls, self.source, progress=run.progress)
            if self.source.retry_failed:
                self.redo_units_naming(set(again), run.out_dir)
        url_store(self.source.folder).count_urls(urls, self.counts)

    def web_urls(self) -> set[str]:
        """Every distinct http(s) url of every unit (others are never fetched: ``bad_url``)."""
        return {url for unit in self.units for url in self.urls_of(unit) if is_web_url(url)}

    def redo_units_naming(self, urls: set[str], out_dir: str) -> None:
        """Units whose documents name one of ``urls`` lose their marker and output: redone."""
        if not urls:
            return
        for unit in self.units:
            if not urls.isdisjoint(self.urls_of(unit)):
                discard_partial(out_dir, unit.name)
