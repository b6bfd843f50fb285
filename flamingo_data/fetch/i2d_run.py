"""img2dataset as a library: Flamingo-ready settings, no telemetry, bounded timeouts, incremental resume.

img2dataset spawns processes, so its caller needs an ``if __name__ == "__main__":`` guard (the CLI has
one). Its workers fetch with ``flamingo_data.fetch.web.fetch`` instead of its own unbounded
``urlopen().read()`` (see ``flamingo_data.fetch.i2d_worker``). albumentations, imported by
img2dataset, calls PyPI on import unless told not to: we tell it, and import img2dataset only when
a download really starts. Ray is never started: the ``multiprocessing`` distributor runs everything
on this machine.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from flamingo_data.core.extras import require_extra
from flamingo_data.errors import MissingExtra
from flamingo_data.fetch.web import MAX_DOWNLOAD_BYTES

# Directives with which a site asks that its images not be used for AI training or indexing.
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass(frozen=True)
class DownloadOptions:
    """How img2dataset fetches: parallelism, bounded timeouts/retries, opt-outs. It stores each
    image's bytes as fetched; the image stage then checks, converts and resizes them."""

    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 1
    samples_per_shard: int = 10_000
    respect_opt_out: bool = True
    max_bytes: int = MAX_DOWNLOAD_BYTES  # a bigger body is refused (too_many_bytes)


def run_img2dataset(
    url_list: str,
    output: str,
    *,
    url_col: str,
    caption_col: str | None,
    options: DownloadOptions,
    extra_columns: list[str] | None = None,
    input_format: str = "parquet",
    journal: str | None = None,
    progress: Callable[[], None] | None = None,
) -> None:
    """Download into ``output`` (webdataset jpg/txt/json); finished shards are skipped on a rerun,
    and with a ``journal`` folder no url logged there is fetched again
    (``flamingo_data.fetch.journal``). ``progress`` replaces img2dataset's shard counter: called
    about twice a second while the download runs. Without the [download] extra raises
    MissingExtra."""
    require_extra("download", "run_img2dataset")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    hooks = _img2dataset_hooks(options.max_bytes, journal, quiet=progress is not None)
    with hooks, _interrupt_raises(), _every_half_second(progress):
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
            resize_mode="no",
            disable_all_reencoding=True,
            timeout=options.timeout,
            retries=options.retries,
            enable_wandb=False,
            number_sample_per_shard=options.samples_per_shard,
            compute_hash=None,
            incremental_mode="incremental",
            distributor="multiprocessing",
            user_agent_token="img2dataset" if options.respect_opt_out else None,
            disallowed_header_directives=OPT_OUT_DIRECTIVES if options.respect_opt_out else None,
        )


@contextlib.contextmanager
def _img2dataset_hooks(max_bytes: int, journal: str | None, quiet: bool) -> Iterator[None]:
    """img2dataset builds its downloader, progress logger and pool by names in its ``main`` and
    ``distributor``: ours while the download runs (its workers fetch with ``fetch``, its processes
    leave Ctrl-C to this one and end with it; ``quiet``: no shard counter), upstream's again
    afterwards."""
    from flamingo_data.fetch.i2d_worker import (
        BoundedDownloader,
        TiedLoggerProcess,
        tied_spawn_context,
    )

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
    upstream = (
        i2d_main.Downloader,
        i2d_main.LoggerProcess,
        i2d_distributor.get_context,
        i2d_distributor.tqdm,
    )
    i2d_main.Downloader = partial(BoundedDownloader, max_bytes=max_bytes, journal=journal)
    i2d_main.LoggerProcess = TiedLoggerProcess
    i2d_distributor.get_context = tied_spawn_context
    if quiet:
        i2d_distributor.tqdm = _no_bar
    try:
        yield
    finally:
        (
            i2d_main.Downloader,
            i2d_main.LoggerProcess,
            i2d_distributor.get_context,
            i2d_distributor.tqdm,
        ) = upstream


def _no_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    return iterable


@contextlib.contextmanager
def _every_half_second(tick: Callable[[], None] | None) -> Iterator[None]:
    """``tick()`` from a daemon thread about twice a second meanwhile, and once at the end."""
    if tick is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            tick()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        tick()


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
