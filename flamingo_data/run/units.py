"""Units of work: one input shard in, its own output shards + a completion marker out.

That gives parallelism without coordination, resumability (a finished unit is skipped; an
unfinished unit's partial output is discarded and redone) and byte-identical reruns. The
driver merges every unit's marker into ``sizes.json``, ``stats.json`` and ``rejects.jsonl``.

A remote ``out_dir`` (``s3://``, ``gs://`` ... through fsspec) gets the same files: each unit is
written to a local staging folder, then its shards and rejects are uploaded and its marker last,
so a marker never exists without its shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from flamingo_data.core.records import NON_FINITE_AS_NULL, EncodedRecord
from flamingo_data.core.stats import Stats
from flamingo_data.errors import OutputExistsError, RunIncomplete, SettingsMismatch  # noqa: F401 -- importable from here too
from flamingo_data.run.outcome import DEFAULT_MAX_REJECT_SHARE, check_reject_share
from flamingo_data.storage import remote
from flamingo_data.storage.atomic import TMP_SUFFIX, write_atomic
from flamingo_data.storage.shard_writer import ShardWriter

MARKER_DIR = "_done"
REJECTS_DIR = "_rejects"
FINAL_FILES = ("sizes.json", "stats.json", "rejects.jsonl")  # written by finalize at the end
SETTINGS_FILE = "_settings.json"  # LAION: the output settings of the run, for --resume
WORK_DIR = "_work"  # a run's work files, kept for --resume until the run succeeds (see work_dir)
# work files that may lie directly in a local output folder: --resume and --overwrite gather them
# into WORK_DIR, so such a run resumes with its downloads and ends as tidy as any other
LOOSE_WORK = ("_download", "_inputs", "_web_only", "_fetched", "_images", "_urls.parquet")


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A file a successful run leaves in its output folder, as docs/formats.md's table names it:
    ``name`` (``<...>`` is any name, ``NNNNN`` five digits), ``when`` (which runs write it) and
    ``converters`` (empty: every converter)."""

    name: str
    when: str
    converters: tuple[str, ...] = ()
    rejects_only: bool = False


UNIT_CONVERTERS = ("mmc4", "chatgpt", "conversations", "obelics")
OUTPUT_FILES = (
    OutputFile("<unit>-NNNNN.tar", "MMC4, ChatGPT, conversations, OBELICS", UNIT_CONVERTERS),
    OutputFile("<shard>.tar", "LAION", ("laion",)),
    OutputFile("<shard>.parquet", "LAION", ("laion",)),
    OutputFile("<shard>_stats.json", "LAION", ("laion",)),
    OutputFile("sizes.json", "every run"),
    OutputFile("stats.json", "every run"),
    OutputFile("rejects.jsonl", "with `--rejects`", rejects_only=True),
    OutputFile(f"{REJECTS_DIR}/<unit>.jsonl", "with `--rejects`", rejects_only=True),
    OutputFile(f"{MARKER_DIR}/<unit>.json", "every run"),
    OutputFile(SETTINGS_FILE, "LAION", ("laion",)),
    OutputFile("_chunking.json", "conversations", ("conversations",)),
)


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
    fsync: bool = (
        True  # off: faster on scratch disks, but a power loss can corrupt committed shards
    )
    # what decides the output (image policy, what is kept, shard sizes); recorded in each marker
    # so that --resume refuses to finish a run with other options (see output_settings)
    settings: dict[str, Any] = field(default_factory=dict)
    # share of records not written above which the run ends with a warning (see outcome.py)
    max_reject_share: float = DEFAULT_MAX_REJECT_SHARE
    progress: bool = False  # progress bars on stderr for the steps before the units (downloads)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", remote.local_form(self.out_dir))
        check_reject_share(self.max_reject_share)


@dataclass
class UnitContext:
    """What a converter's per-unit function writes into: samples, counts and rejects."""

    unit: Unit
    writer: ShardWriter
    stats: Stats
    rejects: list[dict[str, Any]] = field(default_factory=list)
    placed: dict[str, int] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        """The local folder this unit's shards go into."""
        return self.writer.out_dir

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.writer.write(key, members)

    def place(self, shard: str, samples: int) -> None:
        """Record a whole shard the unit put into ``out_dir`` itself (an adopted download), so its
        marker and sizes.json list it with its sample count."""
        self.placed[shard] = samples

    def write_record(self, key: str, record: EncodedRecord) -> None:
        """Write ``<key>.json`` and count its values written as null (``values.non_finite_as_null``):
        a value JSON cannot hold is changed, so the change is counted, never silent."""
        self.writer.write(key, {"json": record.data})
        if record.non_finite_as_null:
            self.stats.add("values", NON_FINITE_AS_NULL, record.non_finite_as_null)

    def reject(self, category: str, key: str, reason: str, detail: str = "", **extra: str) -> None:
        """Count a rejected item and keep its reason for ``rejects.jsonl``."""
        self.stats.reject(category, reason)
        self.list_reject(category, key, reason, detail, **extra)

    def list_reject(
        self, category: str, key: str, reason: str, detail: str = "", **extra: str
    ) -> None:
        """Keep a line for ``rejects.jsonl`` only: the caller counts the outcome itself (a missing
        image is ``images.missing``, not a rejection)."""
        entry = {"unit": self.unit.name, "key": key, "kind": category, "reason": reason}
        if detail:
            entry["detail"] = detail[:500]
        entry.update({name: value for name, value in extra.items() if value})
        self.rejects.append(entry)

    def settle_images(self, since: int, document: str) -> None:
        """Give the image lines listed since ``len(rejects) == since`` their document's outcome
        (``written`` or ``rejected``): a kept document's missing images are the ones to re-fetch."""
        for entry in self.rejects[since:]:
            if entry["kind"] == "images":
                entry["document"] = document


UnitFn = Callable[[Unit, UnitContext], None]


def marker_path(out_dir: str | Path, unit_name: str) -> Path:
    return Path(out_dir) / MARKER_DIR / f"{unit_name}.json"


def _marker_url(out_dir: str, unit_name: str) -> str:
    return remote.join(out_dir, MARKER_DIR, f"{unit_name}.json")


def load_marker(out_dir: str | Path, unit_name: str) -> dict[str, Any] | None:
    """The unit's marker if it is readable and every shard it lists exists, else None: the unit
    is then unfinished and is redone."""
    out = str(out_dir)
    path = _marker_url(out, unit_name)
    if not remote.exists(path):
        return None
    marker = read_marker(path)
    if marker is not None and all(remote.exists(remote.join(out, n)) for n in marker["shards"]):
        return marker
    return None


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker at ``path``, or None when it is not a whole marker (empty, cut short, not UTF-8,
    not a JSON object, fields missing or of the wrong type): what a power loss under --no-fsync
    can leave, so every reader treats it as an unfinished unit rather than failing on it."""
    try:
        marker = json.loads(remote.read_bytes(path).decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return None
    return marker if _is_marker(marker) else None


def _is_marker(marker: Any) -> bool:
    """The fields the readers rely on, with their types: unit name, shards by name with their
    sample counts, stats with counts and reasons by category."""
    if not isinstance(marker, dict) or not isinstance(marker.get("unit"), str):
        return False
    shards, stats = marker.get("shards"), marker.get("stats")
    if not isinstance(shards, dict) or not isinstance(stats, dict):
        return False
    if not all(isinstance(k, str) and _is_count(v) for k, v in shards.items()):
        return False
    return all(_is_table(stats.get(part, {})) for part in ("counts", "reasons"))


def _is_table(table: Any) -> bool:
    """``{category: {name: count}}`` as Stats writes it."""
    return isinstance(table, dict) and all(
        isinstance(row, dict) and all(_is_count(n) for n in row.values()) for row in table.values()
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def run_unit(unit: Unit, fn: UnitFn, options: RunOptions) -> dict[str, Any]:
    """Run one unit to completion (or reuse its marker under resume); returns its marker."""
    marker = load_marker(options.out_dir, unit.name) if options.resume else None
    if marker is not None and not input_was_unreadable(marker):
        marker["resumed"] = True
        return marker
    discard_partial(options.out_dir, unit.name)
    if not remote.is_remote(options.out_dir):
        return _write_unit(Path(options.out_dir), unit, fn, options, options.fsync)
    stage = stage_dir(options.out_dir, unit.name)
    shutil.rmtree(stage, ignore_errors=True)  # what a killed earlier attempt left
    try:
        (stage / MARKER_DIR).mkdir(parents=True)
        (stage / REJECTS_DIR).mkdir()
        marker = _write_unit(stage, unit, fn, options, fsync=False)  # durability is the store's
        _upload_unit(stage, options.out_dir, marker)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return marker


def input_was_unreadable(marker: dict[str, Any]) -> bool:
    """The unit's input could not be read whole (a cut-off zip, a sequence file that is not JSON):
    resume redoes it, so a download repaired since is converted rather than skipped for good."""
    return marker["stats"].get("counts", {}).get("units", {}).get("rejected", 0) > 0


def check_markers_visible(out_dir: str | Path, markers: list[dict[str, Any]]) -> None:
    """Every unit a worker finished has its marker where the driver reads: a worker writing to
    another filesystem (``memory://`` lives in one process; a cluster without a shared --out)
    would otherwise end in an empty sizes.json and exit 0."""
    out = str(out_dir)
    listed = {
        posixpath.basename(path) for path in list_markers(out)
    }  # one listing, not a stat each
    lost = [m["unit"] for m in markers if f"{m['unit']}.json" not in listed]
    if lost:
        raise RunIncomplete(
            f"{len(lost)} of {len(markers)} finished units left no marker in {out} that this "
            f"process can see (first: {lost[0]}): the workers wrote to another filesystem; "
            "memory:// lives in one process (use `processes` 1), a cluster needs a shared `out_dir`"
        )


def stage_dir(out_dir: str, unit_name: str) -> Path:
    """Local staging folder of one unit of a remote run: a fixed name, so a retry after a kill
    finds and clears the old one."""
    digest = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "flamingo-data-stage" / digest / unit_name


def _write_unit(
    out: Path, unit: Unit, fn: UnitFn, options: RunOptions, fsync: bool
) -> dict[str, Any]:
    """Shards, rejects part and marker of one unit in the local folder ``out``."""
    writer = ShardWriter(out, unit.name, options.max_samples, options.max_bytes, fsync)
    ctx = UnitContext(unit, writer, Stats(converter=options.converter))
    try:
        fn(unit, ctx)
    except BaseException:
        writer.abort()
        raise
    shards = {**writer.close(), **ctx.placed}
    if options.write_rejects:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in ctx.rejects)
        (out / REJECTS_DIR).mkdir(exist_ok=True)
        write_atomic(out / REJECTS_DIR / f"{unit.name}.jsonl", lines.encode(), fsync)
    marker = {
        "unit": unit.name,
        "source": unit.source,
        "shards": shards,
        "stats": ctx.stats.to_json(),
    }
    if options.settings:
        marker["settings"] = options.settings
    write_atomic(marker_path(out, unit.name), json.dumps(marker, sort_keys=True).encode(), fsync)
    return marker


def _upload_unit(stage: Path, out_dir: str, marker: dict[str, Any]) -> None:
    """Shards first, then the rejects part, the marker last: a crash in between leaves no marker,
    and the unit is redone on resume."""
    for name in marker["shards"]:
        remote.put_file(stage / name, remote.join(out_dir, name))
    rejects = stage / REJECTS_DIR / f"{marker['unit']}.jsonl"
    if rejects.exists():
        remote.put_file(rejects, remote.join(out_dir, REJECTS_DIR, rejects.name))
    name = marker["unit"]
    remote.write_bytes(_marker_url(out_dir, name), marker_path(stage, name).read_bytes())


def discard_partial(out_dir: str | Path, unit_name: str) -> None:
    """Remove whatever an unfinished earlier attempt at this unit left behind."""
    out = str(out_dir)
    _remove(_marker_url(out, unit_name))
    for path in _unit_outputs(out, unit_name):
        _remove(path)
    _remove(remote.join(out, REJECTS_DIR, f"{unit_name}.jsonl"))


def _unit_outputs(out: str, unit_name: str) -> list[str]:
    """This unit's shard files (``<unit>-NNNNN.tar`` and their temp names), not other units'."""
    found = _glob(out, f"{unit_name}-*.tar*")
    prefix = len(unit_name) + 1
    return [p for p in found if posixpath.basename(p)[prefix:].split(".")[0].isdigit()]


def _glob(folder: str, pattern: str) -> list[str]:
    """Sorted matches in ``folder`` (local or remote), as paths in the folder's own form."""
    if remote.is_remote(folder):
        return sorted(remote.glob(remote.join(folder, pattern)))
    return sorted(str(p) for p in Path(folder).glob(pattern))


def _put(folder: str, name: str, data: bytes) -> None:
    """Write a driver-side file: atomic rename locally, one object put remotely."""
    if remote.is_remote(folder):
        remote.write_bytes(remote.join(folder, name), data)
    else:
        write_atomic(Path(folder) / name, data)


def _remove_tree(path: str) -> None:
    if remote.is_remote(path):
        remote.remove_tree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: str) -> None:
    if remote.is_remote(path):
        remote.remove(path)
    else:
        Path(path).unlink(missing_ok=True)


def local_out(out_dir: str | Path) -> Path:
    """The local folder that stands for ``out_dir``: the folder itself when it is local; for a
    remote out ``$FLAMINGO_DATA_WORK/<hash of the url>`` (default ``~/.cache/flamingo-data/work``),
    where downloads go and LAION builds its output before the upload."""
    out = str(out_dir)
    if not remote.is_remote(out):
        return Path(out)
    base = os.environ.get("FLAMINGO_DATA_WORK") or Path.home() / ".cache" / "flamingo-data" / "work"
    return Path(base) / hashlib.sha256(out.encode()).hexdigest()[:16]


def work_dir(out_dir: str | Path) -> Path:
    """Local folder for a run's work files (downloads, input copies): ``_work/`` in
    ``local_out``, kept for --resume until the run succeeds, then removed (``drop_work``). It
    sits inside the output folder so that LAION's checked downloads are hard-linked into place on
    the same file system, and one hidden folder holds all of them."""
    return local_out(out_dir) / WORK_DIR


def work_url(out_dir: str | Path) -> str:
    """``_work/`` inside ``out_dir`` itself, local or remote: work files that executors on other
    machines read (conversation chunks)."""
    return remote.join(str(out_dir), WORK_DIR)


def earlier_work(out_dir: str | Path, name: str) -> bool:
    """Whether an earlier run left the work file ``name``: in the work folder, or directly in a
    local ``out_dir`` (see ``LOOSE_WORK``)."""
    out = str(out_dir)
    loose = not remote.is_remote(out) and (Path(out) / name).exists()
    return loose or (local_out(out) / WORK_DIR / name).exists()


def drop_work(out_dir: str | Path) -> None:
    """After a successful run: its work folders go (a remote out's local folder whole, and the
    ``_work/`` in the bucket), and so does an empty ``_rejects/``, leaving ``OUTPUT_FILES``."""
    out = str(out_dir)
    if remote.is_remote(out):
        shutil.rmtree(local_out(out), ignore_errors=True)
        remote.remove_tree(work_url(out))
        return
    shutil.rmtree(Path(out) / WORK_DIR, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty, or not there
        (Path(out) / REJECTS_DIR).rmdir()


def gather_loose_work(out_dir: Path) -> None:
    """Move ``LOOSE_WORK`` files found directly in ``out_dir`` into its work folder."""
    for name in LOOSE_WORK:
        loose = out_dir / name
        if loose.exists() or loose.is_symlink():
            target = work_dir(out_dir) / name
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # the work folder's own copy is the newer one
                _remove_local(loose)
            else:
                os.replace(loose, target)


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def all_done(out_dir: str | Path, unit_names: Iterable[str]) -> bool:
    """Whether every one of these units has a whole marker and read its input whole, i.e.
    ``run_unit`` would skip each under --resume: a finished run, whose work files are gone."""
    for name in unit_names:
        marker = load_marker(out_dir, name)
        if marker is None or input_was_unreadable(marker):
            return False
    return True


def upload_files(local: Path, out_dir: str, names: Iterable[str]) -> None:
    """Copy finished files from a local work folder to a remote --out, in the order given."""
    for name in names:
        remote.put_file(local / name, remote.join(out_dir, name))


def list_markers(out_dir: str | Path) -> list[str]:
    """Marker files of finished units (local or remote), sorted."""
    return _glob(str(out_dir), f"{MARKER_DIR}/*.json")


def output_settings(run: RunOptions, **settings: Any) -> RunOptions:
    """``run`` carrying the options that decide a unit's bytes, in their JSON form (as markers hold
    them), plus the shard size limits; paths are left out, so moved inputs still resume.
    ``rejects`` too (only when on, so markers without it still match): a finished unit keeps its
    rejects part as written, so a change would leave rejects.jsonl missing some units' rejects."""
    every = {**settings, "max_samples": run.max_samples, "max_bytes": run.max_bytes}
    if run.write_rejects:
        every["rejects"] = True
    return replace(run, settings=json.loads(json.dumps(every, default=_plain)))


def _plain(value: Any) -> Any:
    if hasattr(value, "as_settings"):
        return value.as_settings()
    return asdict(value) if is_dataclass(value) else str(value)


def check_resume_settings(out_dir: str | Path, settings: dict[str, Any]) -> None:
    """Finishing a run with other options would mix two kinds of shard in one dataset: refuse,
    naming what differs. Markers that carry no settings are not compared."""
    for path in list_markers(out_dir):
        marker = read_marker(path)  # a damaged marker's unit is redone, so it compares nothing
        _refuse_other_settings(out_dir, marker and marker.get("settings"), settings)


def record_settings(out_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """The same guard for a converter without unit markers (LAION): one settings file per run."""
    path = out_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=_plain))
    if resume and path.exists():
        _refuse_other_settings(out_dir, json.loads(path.read_bytes()), settings)
    write_atomic(path, json.dumps(settings, sort_keys=True).encode(), fsync=True)


def _refuse_other_settings(out_dir: str | Path, earlier: Any, settings: dict[str, Any]) -> None:
    if isinstance(earlier, dict) and earlier != settings:
        raise SettingsMismatch(
            f"{out_dir} was written with other options ({'; '.join(_changed(earlier, settings))}):"
            " resume with the same options, or pass `overwrite`"
        )


def _changed(earlier: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs, by dotted name and value (``policy.quality: 90 in the run, 70 now``), so the
    user knows which option to pass and with what: a default that changed between versions
    otherwise reads as a mystery."""
    names = []
    for key in sorted({*earlier, *now}):
        old, new = earlier.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            names.append(
                f"{prefix}{key}: {_shown(old, key in earlier)} in the run, {_shown(new, key in now)} now"
            )
    return names


def _shown(value: Any, present: bool) -> str:
    """A setting's value as JSON, cut short: some are lists of input names."""
    if not present:
        return "unset"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare_out_dir(
    out_dir: str | Path, resume: bool, overwrite: bool, settings: dict[str, Any] | None = None
) -> Path | str:
    """Create the folder; refuse to mix with an earlier run unless resuming (with the same
    ``settings``, when given) or overwriting."""
    out = str(out_dir)
    if remote.is_remote(out):
        remote.makedirs(remote.join(out, MARKER_DIR))
    else:
        (Path(out) / MARKER_DIR).mkdir(parents=True, exist_ok=True)
    earlier = _glob(out, f"{MARKER_DIR}/*.json")
    if earlier and not (resume or overwrite):
        raise OutputExistsError(
            f"{out} holds {len(earlier)} finished units of an earlier run: pass `resume` or `overwrite`"
        )
    if resume and settings and not overwrite:
        check_resume_settings(out, settings)
    if (resume or overwrite) and not remote.is_remote(out):
        gather_loose_work(Path(out))
    _remove_tree(remote.join(out, "_chunks"))  # chunks loose in the folder: rewritten every run
    stale = _glob(out, f"*{TMP_SUFFIX}")
    if overwrite:
        drop_work(out)
        stale += [*earlier, *_glob(out, "*.tar"), *_glob(out, f"{REJECTS_DIR}/*")]
        # a run without --rejects writes no rejects.jsonl to replace it, and a killed run no
        # sizes.json: the earlier run's would give the loader counts of deleted shards
        stale += [p for name in FINAL_FILES for p in _glob(out, name)]
    for path in stale:
        _remove(path)
    return out if remote.is_remote(out) else Path(out)


def finalize(out_dir: str | Path, converter: str, extra_stats: Stats | None = None) -> Stats:
    """Merge every unit marker in the folder into sizes.json, stats.json and rejects.jsonl. A
    damaged marker left here (its unit was redone, unless it is not in this run's input) is
    counted as ``units: damaged_marker``, not merged."""
    out = str(out_dir)
    read = [read_marker(p) for p in _glob(out, f"{MARKER_DIR}/*.json")]
    markers = [m for m in read if m is not None]
    sizes: dict[str, int] = {}
    total = Stats(converter=converter)
    if damaged := len(read) - len(markers):  # left by a unit that is not in this run's input
        total.add("units", "damaged_marker", damaged)
    for marker in markers:
        sizes.update(marker["shards"])
        total.merge(Stats.from_json(marker["stats"]))
    if extra_stats is not None:
        total.merge(extra_stats)
    total.add("units", "done", len(markers))
    total.add("shards", "written", len(sizes))
    _put(out, "sizes.json", json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    _put(out, "stats.json", json.dumps(total.to_json(), indent=1).encode())
    parts = _glob(out, f"{REJECTS_DIR}/*.jsonl")
    if parts:
        _put(out, "rejects.jsonl", b"".join(remote.read_bytes(p) for p in parts))
    return total


def duplicate_inputs(names: list[str], converter: str) -> Stats | None:
    """Stats counting input files named more than once (``units.duplicate_input``; see
    ``expand_specs``), or None when there is none, so that other runs' stats stay as they are."""
    if not names:
        return None
    stats = Stats(converter=converter)
    stats.add("units", "duplicate_input", len(names))
    return stats


def unit_names(sources: Iterable[str], stem: Callable[[str], str]) -> list[Unit]:
    """Units for ``sources`` with unique names (a clash gets the list position appended)."""
    units, seen = [], set()
    for index, source in enumerate(sources):
        name = stem(source)
        while name in seen:  # the suffixed name can be another source's own stem
            name = f"{name}_{index}"
        seen.add(name)
        units.append(Unit(name=name, source=source, index=index))
    return units
