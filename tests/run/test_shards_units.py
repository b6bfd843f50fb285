"""Shard writer and unit runner: determinism, rollover, atomic commit, markers, resume, merged sidecars."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from flamingo_data.core.schema import schema_errors
from flamingo_data.run.executors import Execution, run_units
from flamingo_data.run.units import (
    LOOSE_WORK,
    WORK_DIR,
    OutputExistsError,
    RunOptions,
    Unit,
    drop_work,
    finalize,
    prepare_out_dir,
    run_unit,
    unit_names,
)
from flamingo_data.storage import shard_writer as shards
from flamingo_data.storage.shard_writer import ShardWriter, safe_stem


def write_samples(out: Path, n: int, **kwargs) -> dict[str, int]:
    writer = ShardWriter(out, "unit", **kwargs)
    for i in range(n):
        writer.write(f"unit-{i:04d}", {"json": json.dumps({"i": i}).encode(), "txt": b"x" * 100})
    return writer.close()


def test_same_samples_give_byte_identical_tars(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_samples(tmp_path / name, 5)
    assert (tmp_path / "a" / "unit-00000.tar").read_bytes() == (
        tmp_path / "b" / "unit-00000.tar"
    ).read_bytes()
    with tarfile.open(tmp_path / "a" / "unit-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["unit-0000.json", "unit-0000.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}


def test_rollover_by_count_and_by_bytes(tmp_path: Path) -> None:
    assert write_samples(tmp_path, 7, max_samples=3) == {
        "unit-00000.tar": 3,
        "unit-00001.tar": 3,
        "unit-00002.tar": 1,
    }
    other = tmp_path / "bytes"
    other.mkdir()
    sizes = write_samples(other, 10, max_bytes=2048)
    assert len(sizes) > 2 and sum(sizes.values()) == 10


def test_no_finished_looking_shard_before_commit_and_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "unit")
    writer.write("unit-0", {"json": b"{}"})
    assert list(tmp_path.glob("*.tar")) == [] and len(list(tmp_path.glob("*.tar.tmp"))) == 1
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_early_writeback_covers_the_shard_in_order_and_changes_no_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fsync on, finished stretches go to the disk while writing (so the commit's fsync has
    little left); the advice ranges tile the file from 0 and the tar is the same as without."""
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise
    monkeypatch.setattr(shards, "WRITEBACK_CHUNK", 1024)
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, offset, length, advice: (
            calls.append((offset, length)) or real(fd, offset, length, advice)
        ),
    )
    for name, fsync in (("synced", True), ("unsynced", False)):
        (tmp_path / name).mkdir()
        write_samples(tmp_path / name, 20, fsync=fsync)
    data = (tmp_path / "synced" / "unit-00000.tar").read_bytes()
    assert data == (tmp_path / "unsynced" / "unit-00000.tar").read_bytes()
    assert len(calls) > 5 and calls[0][0] == 0  # only the synced writer advised
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:], strict=False))
    assert all(n >= 1024 for _, n in calls) and calls[-1][0] + calls[-1][1] <= len(data)


def test_safe_stem_removes_dots_and_slashes() -> None:
    assert safe_stem("docs_shard_1.v2/../x") == "docs_shard_1_v2_x"


def test_unit_names_stay_unique_when_a_suffixed_name_is_taken() -> None:
    """``a/s`` and ``b/s`` at position 2 would become ``s_2``, the name of the zip ``s_2`` itself:
    two units writing the same shards and marker, one zip's documents lost without a count."""
    units = unit_names(["a/s.zip", "s_2.zip", "b/s.zip"], lambda p: Path(p).stem)
    assert len({u.name for u in units}) == 3


def _unit_fn(unit: Unit, ctx) -> None:
    for i in range(4):
        ctx.stats.add("documents", "in")
        if i == 3:
            ctx.reject("documents", f"{unit.name}-{i}", "odd_one")
            continue
        ctx.write(f"{unit.name}-{i}", {"json": b"{}"})
        ctx.stats.add("documents", "written")


def _failing_fn(unit: Unit, ctx) -> None:
    ctx.write(f"{unit.name}-0", {"json": b"{}"})
    raise RuntimeError("crash mid-unit")


def test_units_markers_resume_and_sidecars(tmp_path: Path) -> None:
    units = [Unit(f"u{i}", f"src{i}", i) for i in range(3)]
    options = RunOptions(out_dir=str(tmp_path), converter="t", write_rejects=True)
    prepare_out_dir(tmp_path, resume=False, overwrite=False)
    run_units(units, _unit_fn, options, Execution(processes=1, progress=False))
    stats = finalize(tmp_path, "t")
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {f"u{i}-00000.tar": 3 for i in range(3)} and not schema_errors("sizes", sizes)
    written = json.loads((tmp_path / "stats.json").read_text())
    assert not schema_errors("stats", written)
    assert written["counts"]["documents"] == {"in": 12, "written": 9, "rejected": 3}
    assert written["reasons"]["documents"] == {"odd_one": 3} and stats.get("units", "done") == 3
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["u0-3", "u1-3", "u2-3"] and {
        r["reason"] for r in rejects
    } == {"odd_one"}
    with pytest.raises(OutputExistsError):
        prepare_out_dir(tmp_path, resume=False, overwrite=False)
    marker = run_unit(
        units[0], _failing_fn, RunOptions(out_dir=str(tmp_path), converter="t", resume=True)
    )
    assert marker["resumed"] is True  # finished units are skipped, not redone


def test_a_crashed_unit_leaves_no_shard_and_is_redone(tmp_path: Path) -> None:
    unit = Unit("u", "src", 0)
    options = RunOptions(out_dir=str(tmp_path), converter="t", resume=True)
    prepare_out_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(RuntimeError):
        run_unit(unit, _failing_fn, options)
    assert list(tmp_path.glob("u-*")) == [] and not (tmp_path / "_done" / "u.json").exists()
    (tmp_path / "u-00007.tar").write_bytes(b"partial from a killed run")
    run_unit(unit, _unit_fn, options)
    assert sorted(p.name for p in tmp_path.glob("u-*")) == ["u-00000.tar"]


def test_overwrite_clears_an_earlier_run(tmp_path: Path) -> None:
    prepare_out_dir(tmp_path, resume=False, overwrite=False)
    run_units(
        [Unit("u", "s", 0)],
        _unit_fn,
        RunOptions(out_dir=str(tmp_path), converter="t"),
        Execution(processes=1, progress=False),
    )
    prepare_out_dir(tmp_path, resume=False, overwrite=True)
    assert list(tmp_path.glob("*.tar")) == [] and list((tmp_path / "_done").iterdir()) == []


@pytest.mark.parametrize(
    ("max_bytes", "payload", "key"),
    [(100_000, 3000, "u-{:04d}"), (50_000, 700, "u" * 120 + "-{:04d}"), (2048, 100, "u-{:04d}")],
    ids=["headers", "long-names", "below-one-record"],
)
def test_shards_stay_within_max_bytes(
    tmp_path: Path, max_bytes: int, payload: int, key: str
) -> None:
    """The cap counted payload bytes only: tar headers, the end-of-archive blocks and tarfile's
    padding to 10 KiB made a 100 000-byte cap give 102 400-byte shards. Now only a shard of one
    sample, which cannot be split, may exceed it."""
    writer = ShardWriter(tmp_path, "u", max_bytes=max_bytes, fsync=False)
    for i in range(200):
        writer.write(key.format(i), {"json": b"x" * payload, "txt": b"y" * (i % 7)})
    sizes = writer.close()
    assert sum(sizes.values()) == 200
    for name, count in sizes.items():
        assert (tmp_path / name).stat().st_size <= max_bytes or count == 1
    assert max(sizes.values()) > 1 or max_bytes < 10240  # still filled, not one sample each


def test_overwrite_removes_the_earlier_sizes_and_stats(tmp_path: Path) -> None:
    """A killed --overwrite run left the earlier run's sizes.json beside the new shards: the
    loader read counts of shards that were deleted or rewritten with other sizes."""
    prepare_out_dir(tmp_path, resume=False, overwrite=False)
    options = RunOptions(out_dir=str(tmp_path), converter="t")
    run_units([Unit("u", "s", 0)], _unit_fn, options, Execution(processes=1, progress=False))
    finalize(tmp_path, "t")
    assert (tmp_path / "sizes.json").exists() and (tmp_path / "stats.json").exists()
    prepare_out_dir(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / "sizes.json").exists() and not (tmp_path / "stats.json").exists()


def loose_work(out: Path) -> None:
    """The work files as they lie directly in an output folder: img2dataset tars among them."""
    for name in LOOSE_WORK:
        if name.endswith(".parquet"):
            (out / name).write_bytes(b"PAR1")
        else:
            (out / name).mkdir(parents=True)
            (out / name / "00000.tar").write_bytes(b"t" * 1024)
    (out / "_chunks").mkdir()
    (out / "_chunks" / "a-c00000.jsonl").write_text("{}\n")


@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_work_files_loose_in_the_folder_are_gathered_and_then_dropped(
    tmp_path: Path, how: str
) -> None:
    """--resume keeps them for the run, in _work/ (its own newer copy wins); --overwrite deletes
    them with the rest of the earlier run; a success leaves neither them nor an empty _rejects/."""
    prepare_out_dir(tmp_path, resume=False, overwrite=False)
    loose_work(tmp_path)
    (tmp_path / WORK_DIR / "_images").mkdir(parents=True)  # the work folder's own, kept
    (tmp_path / "_rejects").mkdir()
    prepare_out_dir(tmp_path, resume=how == "resume", overwrite=how == "overwrite")
    assert not any((tmp_path / name).exists() for name in (*LOOSE_WORK, "_chunks"))
    gathered = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.tar"))
    if how == "resume":
        dirs = [n for n in LOOSE_WORK if n not in ("_images", "_urls.parquet")]
        assert gathered == sorted(f"{WORK_DIR}/{n}/00000.tar" for n in dirs)
        assert (tmp_path / WORK_DIR / "_urls.parquet").read_bytes() == b"PAR1"
    else:
        assert gathered == [] and not (tmp_path / WORK_DIR).exists()
    drop_work(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_done"]
