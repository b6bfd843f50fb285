"""Process pools that fail loudly: a worker killed mid-task is an error, never a hang.

``multiprocessing.Pool`` replaces a worker that dies (the kernel's out-of-memory killer, a stray
``kill -9``) and then waits forever for the task that worker held: a conversion would sit idle at
hour 10 with no message. ``concurrent.futures`` notices the death (``BrokenProcessPool``), which we
turn into ``WorkerDied``. On any error, Ctrl-C included, the workers are stopped at once, as Pool's
context manager did: a unit a worker had not finished has no marker, so ``--resume`` redoes it.
Workers also end when their parent is killed (``die_with_parent``): an orphan would wait on its
task queue forever, holding its memory beside the ``--resume`` that replaces it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from flamingo_data.errors import WorkerDied  # noqa: F401 -- importable from here too

Item = TypeVar("Item")


# fork where it is safe and cheap (workers inherit the parent's imports); spawn elsewhere
LOCAL_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def map_in_processes(
    task: Callable[[Item], Any],
    items: Sequence[Item],
    processes: int,
    start_method: str = LOCAL_START_METHOD,
    ordered: bool = False,
) -> Iterator[Any]:
    """``task(item)`` for every item in ``processes`` worker processes; results in input order when
    ``ordered``, else as they finish. Raises ``WorkerDied`` when a worker is killed."""
    context = multiprocessing.get_context(start_method)
    pool = ProcessPoolExecutor(
        max(1, min(processes, len(items))),
        mp_context=context,
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )
    finished = 0
    try:
        futures = [pool.submit(task, item) for item in items]
        for future in futures if ordered else as_completed(futures):
            yield future.result()
            finished += 1
    except BrokenProcessPool as exc:
        raise WorkerDied(
            "a worker process died before finishing its task (killed by a signal, most often the "
            f"kernel's out-of-memory killer); {finished} of {len(items)} tasks had finished"
        ) from exc
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers now, not after the tasks already queued to them have run."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    processes: dict[int, multiprocessing.Process] = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.terminate()


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 1.0
_watching_parent = threading.Event()


def die_with_parent(parent_pid: int) -> None:
    """End this worker process when ``parent_pid`` (the process that started it) dies.

    Linux: the kernel sends SIGKILL when the thread that forked us exits; the ``getppid`` check
    after asking for it covers a parent that died before we asked. Elsewhere a daemon thread
    polls ``getppid``. Safe to call again, and a no-op in the parent itself. The pool must be
    started, and outlived, by one thread: the kernel's notice follows that thread."""
    if os.getpid() == parent_pid:
        return
    if not _ask_kernel_for_death_signal():
        _start_parent_watch(parent_pid)
    if os.getppid() != parent_pid:
        _die()


def _ask_kernel_for_death_signal() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``; False where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _start_parent_watch(parent_pid: int) -> None:
    if _watching_parent.is_set():
        return
    _watching_parent.set()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    _die()


def _die() -> None:
    """What the kernel's death signal does: no cleanup, the unit stays unfinished (no marker)."""
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
