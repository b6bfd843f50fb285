"""Images by url for the document converters (MMC4 ``--download-images``, OBELICS-style documents).

A url-image folder is an img2dataset webdataset output (``<n>.tar``, ``<n>.parquet``,
``<n>_stats.json``), downloaded here or elsewhere. A download writes its first attempt in the
folder itself, so the folder stays a plain img2dataset output, and each ``retry_failed`` attempt in
``_retry-NN/`` inside it; ``UrlStore`` reads them as one store in which a later attempt's
success or failure replaces an earlier one's. Each distinct url is fetched once per attempt.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError, OutputExistsError
from flamingo_data.fetch.i2d_output import ImageStore, check_finished, finished_shards
from flamingo_data.fetch.i2d_run import DownloadOptions, run_img2dataset
from flamingo_data.fetch.journal import JournalCounter

URL_LIST = "_urls.parquet"  # the attempt's sorted url list: a resumed attempt shards it alike
RETRY_PREFIX = "_retry-"
JOURNAL_DIR = "_journal"  # see flamingo_data.fetch.journal
URLS_PER_SHARD = 1_000  # at most, so that --download-processes shares even a small download out
DONE_FILE = "_done.json"  # an attempt every shard of which img2dataset finished
# Reason families --retry-failed accepts beside exact reason codes.
REASON_FAMILIES = {"http_5xx": re.compile(r"http_5\d\d"), "http_4xx": re.compile(r"http_4\d\d")}


@dataclass(frozen=True)
class UrlImages:
    """Where a converter's images come from by url: ``folder`` (an img2dataset output; the
    download target when ``download`` is set) and, for a download, the failure reasons whose urls
    an earlier run's attempt is re-attempted for (``retry_failed``)."""

    folder: str
    download: DownloadOptions | None = None
    retry_failed: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.retry_failed and self.download is None:
            raise InputError("`retry_failed` needs `download`: only a download can fetch again")


def attempt_folders(folder: str | Path) -> list[Path]:
    """The folder's attempts in order: the folder itself, then ``_retry-01``, ``_retry-02``..."""
    root = Path(folder)
    retries = sorted(p for p in root.glob(f"{RETRY_PREFIX}*") if p.is_dir())
    return [root, *retries]


class UrlStore:
    """Image bytes by url over every attempt of a url-image folder (a later attempt wins)."""

    def __init__(self, folder: str | Path) -> None:
        self.found: dict[str, tuple[Path, int, int]] = {}
        self.failed: dict[str, str] = {}
        for attempt in attempt_folders(folder):
            store = ImageStore(attempt)
            for url, reason in store.failed.items():
                self.found.pop(url, None)
                self.failed[url] = reason
            for url, where in store.found.items():
                self.failed.pop(url, None)
                self.found[url] = where

    def get(self, url: str, limit: int | None = None) -> tuple[bytes | None, str]:
        """(bytes, "") or (None, reason): img2dataset's reason code, or ``not_downloaded``."""
        where = self.found.get(url)
        if where is None:
            return None, self.failed.get(url, "not_downloaded")
        tar, offset, size = where
        with open(tar, "rb") as handle:
            handle.seek(offset)
            return handle.read(size if limit is None else min(size, limit)), ""

    def count_urls(self, urls: Iterable[str], stats: Stats) -> None:
        """``urls``: in, fetched, failed by reason (each distinct url once)."""
        for url in set(urls):
            stats.add("urls", "in")
            if url in self.found:
                stats.add("urls", "fetched")
            else:
                stats.reject("urls", self.failed.get(url, "not_downloaded"))


_STORES: dict[tuple[str, tuple[tuple[str, int], ...]], UrlStore] = {}


def url_store(folder: str | Path) -> UrlStore:
    """The url store of ``folder``, read once per process while its shards stay the same (a
    process forked after reading it, as a unit worker is, has it too)."""
    signature = tuple(
        (str(p), p.stat().st_mtime_ns)
        for attempt in attempt_folders(folder)
        for p in sorted(attempt.glob("*_stats.json"))
    )
    key = (str(folder), signature)
    if key not in _STORES:
        _STORES.clear()
        _STORES[key] = UrlStore(folder)
    return _STORES[key]


def matches_reason(reason: str, wanted: Iterable[str]) -> bool:
    """``reason`` is one of ``wanted``: an exact code, or a family (``http_5xx``, ``http_4xx``)."""
    return any(
        reason == w or (w in REASON_FAMILIES and REASON_FAMILIES[w].fullmatch(reason))
        for w in wanted
    )


def fetch_url_images(
    urls: Iterable[str], source: UrlImages, *, progress: bool = False
) -> list[str]:
    """Download ``urls`` (http(s) only, each distinct url once) into ``source.folder``; with
    ``source.retry_failed``, re-attempt only the urls an earlier attempt failed with one of those
    reasons, in a new ``_retry-NN`` attempt. Returns the urls this call attempted. An interrupted
    attempt over the same urls continues without fetching a url again; a finished one fetches
    nothing."""
    if source.download is None:
        raise InputError("`download` is not set: nothing to fetch")
    wanted = sorted(set(urls))
    folder = Path(source.folder)
    if source.retry_failed:
        return _retry(wanted, folder, source, progress)
    _attempt(wanted, folder, source.download, progress)
    return wanted


def _retry(urls: list[str], folder: Path, source: UrlImages, progress: bool) -> list[str]:
    """The failed urls again, in a new attempt (or the interrupted retry attempt, continued)."""
    if not (folder / DONE_FILE).exists():
        raise InputError(
            f"the download in `images` {folder} is unfinished: resume it before `retry_failed`"
        )
    store = UrlStore(folder)
    again = [
        u
        for u in urls
        if u not in store.found and matches_reason(_why(store, u), source.retry_failed)
    ]
    attempts = attempt_folders(folder)
    last = attempts[-1]
    if last != folder and (last / URL_LIST).exists() and not (last / DONE_FILE).exists():
        target = last  # an interrupted retry attempt: continued over its own url list
        again = pd.read_parquet(last / URL_LIST)["url"].tolist()
    else:
        target = folder / f"{RETRY_PREFIX}{len(attempts):02d}"
    if again:
        _attempt(again, target, source.download, progress)
    return again


def _why(store: UrlStore, url: str) -> str:
    """Why ``url`` has no image: its attempt's reason, or ``not_downloaded`` (in no attempt)."""
    return store.failed.get(url, "not_downloaded")


def _attempt(urls: list[str], folder: Path, options: DownloadOptions, progress: bool) -> None:
    """One img2dataset run over ``urls`` into ``folder``; an interrupted one resumes without
    fetching a url again (its journal), and ``_done.json`` marks it finished."""
    if not urls or _finished_with(folder, urls):
        return
    folder.mkdir(parents=True, exist_ok=True)
    _check_same_urls(folder / URL_LIST, folder, urls)
    options = replace(options, samples_per_shard=min(options.samples_per_shard, URLS_PER_SHARD))
    pd.DataFrame({"url": urls}).to_parquet(folder / URL_LIST)
    journal = folder / JOURNAL_DIR
    with tqdm(total=len(urls), unit="img", desc="download", disable=not progress) as bar:
        counter = JournalCounter(journal)

        def tick() -> None:
            bar.update(min(counter.count(), len(urls)) - bar.n)

        run_img2dataset(
            str(folder / URL_LIST),
            str(folder),
            url_col="url",
            caption_col=None,
            options=options,
            journal=str(journal),
            progress=tick if progress else None,
        )
    check_finished(folder, math.ceil(len(urls) / options.samples_per_shard))
    (folder / DONE_FILE).write_text(json.dumps({"urls": len(urls)}) + "\n")
    shutil.rmtree(journal, ignore_errors=True)  # its bodies are in the finished shards now


def _finished_with(folder: Path, urls: list[str]) -> bool:
    """An attempt over these very urls already finished: nothing to start img2dataset for."""
    if not (folder / DONE_FILE).exists() or not (folder / URL_LIST).exists():
        return False
    return pd.read_parquet(folder / URL_LIST)["url"].tolist() == urls


def _check_same_urls(previous: Path, folder: Path, urls: list[str]) -> None:
    """img2dataset's incremental mode skips the shards it finished, by number: a changed url list
    would sort other urls into them, never fetched. Refuse instead."""
    if not previous.exists() or not finished_shards(folder):
        return
    before = pd.read_parquet(previous)["url"].tolist()
    if before != urls:
        new, gone = len(set(urls) - set(before)), len(set(before) - set(urls))
        error = UrlListChanged(
            f"the documents name other image urls than the download in {folder} ({new} new, "
            f"{gone} gone): use another `images` folder or remove it"
        )
        error.new, error.gone = new, gone
        raise error


class UrlListChanged(OutputExistsError):
    """The documents name other urls than the download in a url-image folder: ``new`` and
    ``gone`` count them."""

    new: int = 0
    gone: int = 0
