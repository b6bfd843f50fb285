"""Executors: the same units on Spark give the same bytes as the local pool; Ray is optional and never started."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.executors import run_units
from flamingo_data.samples import write_mmc4_sample
from flamingo_data.units import RunOptions


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {
        "sizes.json": (out / "sizes.json").read_bytes()
    }


@pytest.mark.slow
def test_spark_local_gives_byte_identical_output_and_resumes_across_executors(
    tmp_path: Path,
) -> None:
    pytest.importorskip("pyspark")
    sample = write_mmc4_sample(tmp_path / "src", n_shards=3, docs_per_shard=8, seed=4)
    options = Mmc4Options(images=sample["images"])
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(out_dir=str(tmp_path / "local"), converter="mmc4"),
        processes=1,
        progress=False,
    )
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(out_dir=str(tmp_path / "spark"), converter="mmc4"),
        executor="spark",
        master="local[2]",
        progress=False,
    )
    assert tars(tmp_path / "spark") == tars(tmp_path / "local")
    # resume across executors: drop one unit's marker, finish it locally
    (tmp_path / "spark" / "_done" / "shard_1.json").unlink()
    convert_mmc4(
        sample["docs"],
        options,
        RunOptions(out_dir=str(tmp_path / "spark"), converter="mmc4", resume=True),
        processes=1,
        progress=False,
    )
    assert tars(tmp_path / "spark") == tars(tmp_path / "local")


def test_unknown_and_missing_executors_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown executor"):
        run_units(
            [], lambda u, c: None, RunOptions(out_dir=str(tmp_path), converter="t"), executor="dask"
        )
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(RuntimeError, match="needs Ray"):
            run_units(
                [],
                lambda u, c: None,
                RunOptions(out_dir=str(tmp_path), converter="t"),
                executor="ray",
            )
