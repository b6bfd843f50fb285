"""Process pools that fail loudly: a worker killed mid-task is an error, never a hang.

``multiprocessing.Pool`` replaces a worker that dies (the kernel's out-of-memory killer, a stray
``kill -9``) and then waits forever for the task that worker held: a conversion would sit idle at
hour 10 with no message. ``concurrent.futures`` notices the death (``BrokenProcessPool``), which we
turn into ``WorkerDied``. On any error, Ctrl-C included, the workers are stopped at once, as Pool's
context manager did: a unit a worker had not finished has no marker, so ``--resume`` redoes it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from flamingo_data.errors import WorkerDied  # noqa: F401 -- importable from here too

Item = TypeVar("Item")


def map_in_processes(
    task: Callable[[Item], Any],
    items: Sequence[Item],
    processes: int,
    start_method: str,
    ordered: bool = False,
) -> Iterator[Any]:
    """``task(item)`` for every item in ``processes`` worker processes; results in input order when
    ``ordered``, else as they finish. Raises ``WorkerDied`` when a worker is killed."""
    context = multiprocessing.get_context(start_method)
    pool = ProcessPoolExecutor(max(1, min(processes, len(items))), mp_context=context)
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
