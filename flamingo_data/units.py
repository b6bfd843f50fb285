"""Units of work: one input shard in, its own output shards + a completion marker out.

That gives parallelism without coordination, resumability (a finished unit is skipped; an
unfinished unit's partial output is discarded and redone) and byte-identical reruns. The
driver merges every unit's marker into ``sizes.json``, ``stats.json`` and ``rejects.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_data.shards import TMP_SUFFIX, ShardWriter, write_atomic
from flamingo_data.stats import Stats

MARKER_DIR = "_done"
REJECTS_DIR = "_rejects"


class OutputExistsError(RuntimeError):
    """The output folder holds an earlier run and neither resume nor overwrite was asked for."""


@dataclass(frozen=True, slots=True)
class Unit:
    """One input shard. ``name`` prefixes its output shards and keys; ``index`` is its list position."""

    name: str
    source: str
    index: int


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How units are written; shared by every converter."""

    out_dir: str
    converter: str
    max_samples: int = 10_000
    max_bytes: int = 2**30
    write_rejects: bool = False
    resume: bool = False


@dataclass
class UnitContext:
    """What a converter's per-unit function writes into: samples, counts and rejects."""

    unit: Unit
    writer: ShardWriter
    stats: Stats
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.writer.write(key, members)

    def reject(self, category: str, key: str, reason: str, detail: str = "") -> None:
        """Count a rejected item and keep its reason for ``rejects.jsonl``."""
        self.stats.reject(category, reason)
        entry = {"unit": self.unit.name, "key": key, "kind": category, "reason": reason}
        if detail:
            entry["detail"] = detail[:500]
        self.rejects.append(entry)


UnitFn = Callable[[Unit, UnitContext], None]


def marker_path(out_dir: str | Path, unit_name: str) -> Path:
    return Path(out_dir) / MARKER_DIR / f"{unit_name}.json"


def load_marker(out_dir: str | Path, unit_name: str) -> dict[str, Any] | None:
    """The unit's marker if it is complete and every shard it lists exists, else None."""
    path = marker_path(out_dir, unit_name)
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    if all((Path(out_dir) / name).exists() for name in marker["shards"]):
        return marker
    return None


def run_unit(unit: Unit, fn: UnitFn, options: RunOptions) -> dict[str, Any]:
    """Run one unit to completion (or reuse its marker under resume); returns its marker."""
    out = Path(options.out_dir)
    if options.resume and (marker := load_marker(out, unit.name)) is not None:
        marker["resumed"] = True
        return marker
    discard_partial(out, unit.name)
    writer = ShardWriter(out, unit.name, options.max_samples, options.max_bytes)
    ctx = UnitContext(unit, writer, Stats(converter=options.converter))
    try:
        fn(unit, ctx)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    if options.write_rejects:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in ctx.rejects)
        write_atomic(out / REJECTS_DIR / f"{unit.name}.jsonl", lines.encode())
    marker = {
        "unit": unit.name,
        "source": unit.source,
        "shards": shards,
        "stats": ctx.stats.to_json(),
    }
    write_atomic(marker_path(out, unit.name), json.dumps(marker, sort_keys=True).encode())
    return marker


def discard_partial(out: Path, unit_name: str) -> None:
    """Remove whatever an unfinished earlier attempt at this unit left behind."""
    marker_path(out, unit_name).unlink(missing_ok=True)
    for path in out.glob(f"{unit_name}-*.tar*"):
        if path.name[len(unit_name) + 1 :].split(".")[0].isdigit():
            path.unlink()
    (out / REJECTS_DIR / f"{unit_name}.jsonl").unlink(missing_ok=True)


def prepare_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create the folder; refuse to mix with an earlier run unless resuming or overwriting."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_DIR).mkdir(exist_ok=True)
    (out / REJECTS_DIR).mkdir(exist_ok=True)
    earlier = list((out / MARKER_DIR).glob("*.json"))
    if earlier and not (resume or overwrite):
        raise OutputExistsError(
            f"{out} holds {len(earlier)} finished units of an earlier run: pass --resume or --overwrite"
        )
    if overwrite:
        for path in [
            *earlier,
            *out.glob("*.tar"),
            *out.glob(f"*{TMP_SUFFIX}"),
            *(out / REJECTS_DIR).glob("*"),
        ]:
            path.unlink()
    for tmp in out.glob(f"*{TMP_SUFFIX}"):
        tmp.unlink()
    return out


def finalize(out_dir: str | Path, converter: str, extra_stats: Stats | None = None) -> Stats:
    """Merge every unit marker in the folder into sizes.json, stats.json and rejects.jsonl."""
    out = Path(out_dir)
    markers = [json.loads(p.read_text()) for p in sorted((out / MARKER_DIR).glob("*.json"))]
    sizes: dict[str, int] = {}
    total = Stats(converter=converter)
    for marker in markers:
        sizes.update(marker["shards"])
        total.merge(Stats.from_json(marker["stats"]))
    if extra_stats is not None:
        total.merge(extra_stats)
    total.add("units", "done", len(markers))
    total.add("shards", "written", len(sizes))
    write_atomic(out / "sizes.json", json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    write_atomic(out / "stats.json", json.dumps(total.to_json(), indent=1).encode())
    _merge_rejects(out)
    return total


def _merge_rejects(out: Path) -> None:
    parts = sorted((out / REJECTS_DIR).glob("*.jsonl"))
    if parts:
        write_atomic(out / "rejects.jsonl", b"".join(p.read_bytes() for p in parts))


def unit_names(sources: Iterable[str], stem: Callable[[str], str]) -> list[Unit]:
    """Units for ``sources`` with unique names (a clash gets the list position appended)."""
    units, seen = [], set()
    for index, source in enumerate(sources):
        name = stem(source)
        if name in seen:
            name = f"{name}_{index}"
        seen.add(name)
        units.append(Unit(name=name, source=source, index=index))
    return units
