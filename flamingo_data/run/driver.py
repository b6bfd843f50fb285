"""The one driver of every unit converter: settings → output folder → units on an executor → finalize.

A converter builds a ``ConversionPlan`` from its inputs and options (checking them before anything is
written) and hands it to ``run_conversion``; what differs between sources lives in the plan's steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flamingo_data.core.stats import Stats
from flamingo_data.run.executors import Execution, run_units
from flamingo_data.run.outcome import check_output
from flamingo_data.run.units import (
    RunOptions,
    Unit,
    UnitFn,
    drop_work,
    finalize,
    output_settings,
    prepare_out_dir,
)


@dataclass(frozen=True)
class ConversionPlan:
    """One converter's run, its inputs already checked.

    ``settings`` decide the output and are recorded in every marker (``--resume`` refuses others);
    ``units`` lists the units once the output folder is ready; ``convert_unit`` turns one unit into
    records; ``input_counts`` are counts known before any unit runs (missing or duplicate inputs);
    ``before`` runs once the folder is ready (downloads, chunking), with ``overwrite``; ``after``
    runs once the run has written records (a remote upload), before the driver removes the work
    files (``drop_work``). ``records`` is the stats
    category whose ``written`` count is the output, ``read_from`` the one whose ``in`` count is
    the input (see ``check_output``).
    """

    converter: str
    settings: dict[str, Any]
    units: Callable[[RunOptions], list[Unit]]
    convert_unit: UnitFn
    input_counts: Stats | None = None
    before: Callable[[RunOptions, bool], None] | None = None
    after: Callable[[RunOptions], None] | None = None
    records: str = "documents"
    read_from: str | None = None


def run_conversion(
    plan: ConversionPlan,
    run: RunOptions,
    *,
    overwrite: bool = False,
    execution: Execution | None = None,
) -> Stats:
    """Run ``plan`` into ``run.out_dir``; returns the merged stats (also in stats.json). Raises
    ``NothingWritten`` when no record was written."""
    run = output_settings(run, **plan.settings)
    prepare_out_dir(run.out_dir, run.resume, overwrite, run.settings)
    if plan.before is not None:
        plan.before(run, overwrite)
    run_units(plan.units(run), plan.convert_unit, run, execution or Execution())
    stats = finalize(run.out_dir, plan.converter, plan.input_counts)
    # a failed run keeps its work files for --resume
    check_output(stats, run.max_reject_share, plan.records, plan.read_from)
    if plan.after is not None:
        plan.after(run)
    drop_work(run.out_dir)  # the output folder now holds OUTPUT_FILES only
    return stats
