"""Where units run: a local process pool by default; engines (Spark, Ray) plug in with the same call."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tqdm import tqdm

from flamingo_data.errors import InputError, MissingExtra
from flamingo_data.run.procpool import map_in_processes
from flamingo_data.run.units import (
    RunIncomplete,
    RunOptions,
    Unit,
    UnitFn,
    check_markers_visible,
    run_unit,
)


@dataclass(frozen=True)
class Execution:
    """Where and how units run; never changes the output. ``processes``: parallel units (None:
    one per core; Spark's ``local[N]``); ``master``: a Spark master url or a Ray address."""

    executor: str = "local"
    processes: int | None = None
    master: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(
                f"executor must be one of {', '.join(sorted(EXECUTORS))}, not {self.executor!r}"
            )
        if self.processes is not None and self.processes < 1:
            raise InputError(f"processes must be at least 1, not {self.processes}")


def default_processes() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def run_local(
    units: Sequence[Unit], fn: UnitFn, options: RunOptions, execution: Execution
) -> list[dict[str, Any]]:
    """Run units in a process pool (in-process when one process); markers in unit order."""
    processes = min(execution.processes or default_processes(), max(1, len(units)))
    task = partial(run_unit, fn=fn, options=options)
    bar = tqdm(
        total=len(units), unit="unit", desc=options.converter, disable=not execution.progress
    )
    markers: list[dict[str, Any]] = []
    with bar:
        for marker in _map(task, units, processes):
            markers.append(marker)
            bar.update(1)
    return _in_unit_order(markers, units)


def _map(task: Callable[[Unit], dict], units: Sequence[Unit], processes: int) -> Iterator[dict]:
    if processes <= 1:
        yield from map(task, units)
        return
    yield from map_in_processes(task, units, processes)


def run_spark(
    units: Sequence[Unit], fn: UnitFn, options: RunOptions, execution: Execution
) -> list[dict[str, Any]]:
    """One Spark task per unit, on a cluster master or ``local[N]``; the driver only collects markers.

    Workers must be able to import flamingo_data and reach the paths (a shared or remote filesystem).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise MissingExtra("executor 'spark'", "PySpark", "spark") from exc
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    master = execution.master or f"local[{execution.processes or default_processes()}]"
    builder = SparkSession.builder.appName(f"flamingo-data {options.converter}").master(master)
    if master.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    spark = builder.config("spark.ui.enabled", "false").getOrCreate()
    try:
        rdd = spark.sparkContext.parallelize(list(units), max(1, len(units)))
        markers = rdd.map(partial(run_unit, fn=fn, options=options)).collect()
    except Exception as exc:  # PythonException, Py4JJavaError: pages of Java, Spark logs them
        raise RunIncomplete(f"a unit failed under Spark: {spark_failure(str(exc))}") from exc
    finally:
        spark.stop()
    return _in_unit_order(markers, units)


def spark_failure(text: str) -> str:
    """One line for a failed Spark job: the unit's Python error, or that its worker died. The
    exception's text runs to pages of Java stack (Spark has logged it already); the command line
    says what happened in one line, like the local pool."""
    if "Python worker exited unexpectedly" in text:
        return "a Python worker was killed (out of memory?)"
    python_lines = [line for line in text.splitlines() if line and not line[0].isspace()]
    errors = [line for line in python_lines if _looks_like_python_error(line)]
    return (errors[-1] if errors else (python_lines or ["unknown error"])[0])[:300]


def _looks_like_python_error(line: str) -> bool:
    name, colon, _ = line.partition(":")
    return bool(colon) and name.isidentifier() and name.endswith(("Error", "Exception", "Exit"))


def run_ray(
    units: Sequence[Unit], fn: UnitFn, options: RunOptions, execution: Execution
) -> list[dict[str, Any]]:
    """One Ray task per unit on an existing cluster (``execution.master`` = its address); never started
    in tests."""
    try:
        import ray
    except ImportError as exc:
        raise MissingExtra("executor 'ray'", "Ray", "ray") from exc
    ray.init(address=execution.master or "auto", ignore_reinit_error=True)
    task = ray.remote(run_unit)
    return _in_unit_order(ray.get([task.remote(unit, fn, options) for unit in units]), units)


def _in_unit_order(markers: list[dict[str, Any]], units: Sequence[Unit]) -> list[dict[str, Any]]:
    order = {u.name: i for i, u in enumerate(units)}
    return sorted(markers, key=lambda m: order[m["unit"]])


Executor = Callable[[Sequence[Unit], UnitFn, RunOptions, Execution], list[dict[str, Any]]]
EXECUTORS: dict[str, Executor] = {
    "local": run_local,
    "spark": run_spark,
    "ray": run_ray,
}


def run_units(
    units: Sequence[Unit], fn: UnitFn, options: RunOptions, execution: Execution
) -> list[dict[str, Any]]:
    """Run every unit on ``execution``'s executor; each writes its own shards and marker."""
    markers = EXECUTORS[execution.executor](units, fn, options, execution)
    check_markers_visible(options.out_dir, markers)
    return markers
