"""Executors: the same units on Spark give the same bytes as the local pool; Ray is optional and never started."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from flamingo_data.cli import main as cli
from flamingo_data.converters import mmc4
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.errors import MissingExtra
from flamingo_data.run.executors import Execution, run_units
from flamingo_data.run.procpool import WorkerDied
from flamingo_data.run.units import RunIncomplete, RunOptions, Unit, UnitContext


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {
        "sizes.json": (out / "sizes.json").read_bytes()
    }


def outputs(out: Path) -> dict[str, bytes]:
    """Shards and every file the driver merges from the units' markers."""
    return tars(out) | {name: (out / name).read_bytes() for name in ("stats.json", "rejects.jsonl")}


@pytest.mark.slow
def test_spark_local_gives_byte_identical_output_and_resumes_across_executors(
    tmp_path: Path,
) -> None:
    pytest.importorskip("pyspark")
    sample = write_mmc4_sample(tmp_path / "src", n_shards=3, docs_per_shard=8, seed=4)
    options = Mmc4Options(images=sample["images"], drop_docs_with_missing_images=True)
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(out_dir=str(tmp_path / "local"), converter="mmc4", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(out_dir=str(tmp_path / "spark"), converter="mmc4", write_rejects=True),
        execution=Execution(executor="spark", master="local[2]", progress=False),
    )
    assert outputs(tmp_path / "spark") == outputs(tmp_path / "local")
    assert (tmp_path / "local" / "rejects.jsonl").read_text()  # rejects were compared
    # resume across executors: drop one unit's marker, finish it locally
    (tmp_path / "spark" / "_done" / "shard_1.json").unlink()
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(
            out_dir=str(tmp_path / "spark"), converter="mmc4", write_rejects=True, resume=True
        ),
        execution=Execution(processes=1, progress=False),
    )
    assert outputs(tmp_path / "spark") == outputs(tmp_path / "local")


def test_unknown_and_missing_executors_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="executor must be one of"):
        run_units(
            [],
            lambda u, c: None,
            RunOptions(out_dir=str(tmp_path), converter="t"),
            Execution(executor="dask"),
        )
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(MissingExtra, match=r"needs the \[ray\] extra"):
            run_units(
                [],
                lambda u, c: None,
                RunOptions(out_dir=str(tmp_path), converter="t"),
                Execution(executor="ray"),
            )


def four_units(out: Path) -> list[Unit]:
    """Units of a toy converter, with the output folders a converter's driver makes first."""
    (out / "_done").mkdir(parents=True)
    (out / "_rejects").mkdir()
    return [Unit(name=f"u{i}", source=f"s{i}", index=i) for i in range(4)]


def _killed_on_unit_1(unit: Unit, ctx: UnitContext) -> None:
    """A unit whose worker the kernel kills (out of memory) part-way through."""
    ctx.write(f"{unit.name}-0", {"json": b"{}"})
    if unit.name == "u1":
        os.kill(os.getpid(), signal.SIGKILL)


def _one_sample(unit: Unit, ctx: UnitContext) -> None:
    ctx.write(f"{unit.name}-0", {"json": b"{}"})


def test_a_killed_worker_is_an_error_not_a_hang_and_resume_finishes(tmp_path: Path) -> None:
    # multiprocessing.Pool replaced the dead worker and waited forever for its unit
    units = four_units(tmp_path)
    options = RunOptions(out_dir=str(tmp_path), converter="t")
    start = time.monotonic()
    with pytest.raises(WorkerDied, match="out-of-memory"):
        run_units(units, _killed_on_unit_1, options, Execution(processes=2, progress=False))
    assert time.monotonic() - start < 30
    assert not (tmp_path / "_done" / "u1.json").exists()
    resumed = RunOptions(out_dir=str(tmp_path), converter="t", resume=True)
    markers = run_units(units, _one_sample, resumed, Execution(processes=2, progress=False))
    assert [m["unit"] for m in markers] == ["u0", "u1", "u2", "u3"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"u{i}-00000.tar" for i in range(4)]


def _fails_fast_or_sleeps(unit: Unit, ctx: UnitContext) -> None:
    if unit.name == "u0":
        raise OSError(28, "No space left on device")
    time.sleep(60)


def test_an_error_in_one_unit_stops_the_other_workers_at_once(tmp_path: Path) -> None:
    units, options = four_units(tmp_path), RunOptions(out_dir=str(tmp_path), converter="t")
    start = time.monotonic()
    with pytest.raises(OSError, match="No space"):
        run_units(units, _fails_fast_or_sleeps, options, Execution(processes=2, progress=False))
    assert time.monotonic() - start < 20  # not the 3 x 60 s the queued units would take


_REAL_CONVERT_UNIT = mmc4.convert_unit


def _convert_then_killed_on_shard_1(unit: Unit, *args: object, **kwargs: object) -> None:
    """The MMC4 unit, then the kernel kills its worker (forked workers see the patched module)."""
    _REAL_CONVERT_UNIT(unit, *args, **kwargs)
    if unit.name == "shard_1":
        os.kill(os.getpid(), signal.SIGKILL)


def test_cli_reports_a_killed_worker_in_one_line_and_resume_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=3, docs_per_shard=4, seed=2)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--out", str(tmp_path / "out"), "--processes", "2", "--no-progress"]
    monkeypatch.setattr(mmc4, "convert_unit", _convert_then_killed_on_shard_1)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rerun with --resume" in err
    monkeypatch.setattr(mmc4, "convert_unit", _REAL_CONVERT_UNIT)
    assert cli.main([*args, "--resume"]) == 0
    clean = [*args[:-5], "--out", str(tmp_path / "clean"), "--processes", "2", "--no-progress"]
    assert cli.main(clean) == 0
    assert tars(tmp_path / "out") == tars(tmp_path / "clean")
    assert json.loads((tmp_path / "out" / "sizes.json").read_text())  # documents were written


@pytest.mark.slow
def test_a_killed_spark_worker_fails_the_run_and_resume_finishes(tmp_path: Path) -> None:
    """Spark does not hide a lost unit: the job fails (local[N] retries no task), the killed
    unit has no marker, and a resumed run (on any executor) redoes it."""
    cloudpickle = pytest.importorskip("pyspark.cloudpickle")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Spark's workers lack tests/
    units = four_units(tmp_path)
    options = RunOptions(out_dir=str(tmp_path), converter="t")
    with pytest.raises(
        RunIncomplete, match=r"^a unit failed under Spark: a Python worker was killed"
    ):
        run_units(units, _killed_on_unit_1, options, Execution(executor="spark", master="local[2]"))
    assert not (tmp_path / "_done" / "u1.json").exists()
    resumed = RunOptions(out_dir=str(tmp_path), converter="t", resume=True)
    markers = run_units(units, _one_sample, resumed, Execution(processes=1, progress=False))
    assert [m["unit"] for m in markers] == ["u0", "u1", "u2", "u3"]


def _disk_full_on_unit_1(unit: Unit, ctx: UnitContext) -> None:
    ctx.write(f"{unit.name}-0", {"json": b"{}"})
    if unit.name == "u1":
        raise OSError(28, "No space left on device")


@pytest.mark.slow
def test_a_unit_error_under_spark_is_one_line_not_pages_of_java(tmp_path: Path) -> None:
    """The unit's Python error reached the command line as Spark's exception: a traceback through
    py4j and pages of Java stack (exit 1) where the local pool gives one line."""
    cloudpickle = pytest.importorskip("pyspark.cloudpickle")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = four_units(tmp_path)
    options = RunOptions(out_dir=str(tmp_path), converter="t")
    with pytest.raises(RunIncomplete) as caught:
        run_units(
            units, _disk_full_on_unit_1, options, Execution(executor="spark", master="local[2]")
        )
    assert str(caught.value) == (
        "a unit failed under Spark: OSError: [Errno 28] No space left on device"
    )
    assert not (tmp_path / "_done" / "u1.json").exists()
