"""The verdict on a finished run, judged on the dataset's totals (stats.json), not on what this
invocation did: a ``--resume`` of a complete run has nothing left to do and is not an empty run.

A run that wrote no record ends in ``NothingWritten`` (the CLI exits 1); one that rejected more than
``max_reject_share`` of its records logs one warning line. Both name the most frequent reasons, and
both come after stats.json is written, so the user can see every count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping

from flamingo_data.core.stats import Stats
from flamingo_data.errors import InputError, NothingWritten

DEFAULT_MAX_REJECT_SHARE = 0.5
TOP_REASONS = 3

log = logging.getLogger("flamingo_data.run")


def check_reject_share(value: float) -> float:
    """``max_reject_share`` is a share of the records, 0..1."""
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise InputError(f"max_reject_share must be a number from 0 to 1, not {value!r}")
    return float(value)


def check_output(
    stats: Stats,
    max_reject_share: float = DEFAULT_MAX_REJECT_SHARE,
    records: str = "documents",
    read_from: str | None = None,
) -> Stats:
    """``stats`` when the run wrote records; raises ``NothingWritten`` when it wrote none, and
    logs a warning when more than ``max_reject_share`` of the records were not written.
    ``records`` is the category whose ``written`` count is the output; ``read_from`` the category
    whose ``in`` count is the input (default: ``records``)."""
    check_reject_share(max_reject_share)
    read = stats.get(read_from or records, "in")
    written = stats.get(records, "written")
    if written == 0:
        raise NothingWritten(f"0 of {read} {records} written: {top_reasons(stats)}")
    dropped = max(0, read - written)
    if read and dropped / read > max_reject_share:
        log.warning(
            "%d of %d %s not written (%.0f%%, over the max reject share %g): %s",
            dropped,
            read,
            records,
            100 * dropped / read,
            max_reject_share,
            top_reasons(stats),
        )
    return stats


def top_reasons(stats: Stats, limit: int = TOP_REASONS) -> str:
    """The most frequent reject reasons over every category (``missing_image 45, no_images 5``),
    or what else explains an empty output."""
    totals: Counter[str] = Counter()
    for by_reason in stats.reasons.values():
        totals.update(by_reason)
    if not totals:
        return "the input held no records (see stats.json)"
    return f"{ranked_reasons(totals, limit)} (see stats.json)"


def ranked_reasons(counts: Mapping[str, int], limit: int) -> str:
    """``a 7, b 6, 2 more reasons``: the ``limit`` most frequent, ties by name, and how many more."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{reason} {count}" for reason, count in ranked[:limit])
    hidden = len(ranked) - limit
    return f"{shown}, {hidden} more reasons" if hidden > 0 else shown


SUMMARY_REASONS = 5  # reasons shown per category at the end of a run
# Categories whose counts describe the run's bookkeeping rather than items a user may miss.
_BOOKKEEPING = ("units", "shards", "keys", "values")


def summary(
    stats: Stats,
    out: str,
    records: str = "documents",
    read_from: str | None = None,
    rejects: bool = False,
) -> list[str]:
    """The end of a run in the same shape for every converter: records written of those read and
    into how many shards, the reject reasons of each category, where the output is (``rejects``:
    a rejects.jsonl was written)."""
    read = stats.get(read_from or records, "in")
    shards = stats.get("shards", "written")
    lines = [
        f"{stats.converter}: {stats.get(records, 'written')} of {read} {records} written "
        f"into {shards} shard{'' if shards == 1 else 's'}"
    ]
    for category in sorted(stats.reasons):
        if category in _BOOKKEEPING or not stats.reasons[category]:
            continue
        reasons = ranked_reasons(stats.reasons[category], SUMMARY_REASONS)
        lines.append(f"  {category}: {stats.get(category, 'rejected')} rejected ({reasons})")
    files = "sizes.json, stats.json" + (", rejects.jsonl" if rejects else "")
    lines.append(f"  in {out}: the shards, {files}")
    return lines
