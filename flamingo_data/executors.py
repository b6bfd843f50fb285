"""Where units run: a local process pool by default; engines (Spark, Ray) plug in with the same call."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from tqdm import tqdm

from flamingo_data.units import RunOptions, Unit, UnitFn, run_unit


def default_processes() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def run_local(
    units: Sequence[Unit],
    fn: UnitFn,
    options: RunOptions,
    processes: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run units in a process pool (in-process when one process); markers in unit order."""
    processes = min(processes or default_processes(), max(1, len(units)))
    task = partial(run_unit, fn=fn, options=options)
    bar = tqdm(total=len(units), unit="unit", desc=options.converter, disable=not progress)
    markers: list[dict[str, Any]] = []
    with bar:
        for marker in _map(task, units, processes):
            markers.append(marker)
            bar.update(1)
    order = {u.name: i for i, u in enumerate(units)}
    return sorted(markers, key=lambda m: order[m["unit"]])


def _map(task: Callable[[Unit], dict], units: Sequence[Unit], processes: int) -> Iterator[dict]:
    if processes <= 1:
        yield from map(task, units)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        yield from pool.imap_unordered(task, units)


EXECUTORS: dict[str, Callable[..., list[dict[str, Any]]]] = {"local": run_local}


def run_units(
    units: Sequence[Unit],
    fn: UnitFn,
    options: RunOptions,
    executor: str = "local",
    processes: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every unit on the chosen executor; each writes its own shards and marker."""
    if executor not in EXECUTORS:
        raise ValueError(
            f"unknown executor {executor!r}; available: {', '.join(sorted(EXECUTORS))}"
        )
    return EXECUTORS[executor](units, fn, options, processes=processes, progress=progress)
