"""Fault suite: SIGKILL at 10 random points then resume; a full disk mid-run. Nothing lost, nothing twice."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.storage.shard_writer import ShardWriter


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    return write_mmc4_sample(
        root / "src",
        n_shards=10,
        docs_per_shard=30,
        missing_rate=0.1,
        seed=11,
        image_size=(320, 240),
    )


def command(sample: dict, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flamingo_data",
        "convert",
        "mmc4",
        "--docs",
        sample["docs"],
        "--images",
        sample["images"],
        "--out",
        str(out),
        "--processes",
        "2",
        "--no-progress",
        "--max-samples-per-shard",
        "7",
    ]


@pytest.mark.slow
def test_sigkill_at_ten_random_points_then_resume(sample: dict, tmp_path: Path) -> None:
    subprocess.run(command(sample, tmp_path / "whole"), check=True, capture_output=True)
    out, rng = tmp_path / "killed", random.Random(7)
    for attempt in range(10):
        extra = ["--resume"] if attempt else []
        proc = subprocess.Popen(
            command(sample, out) + extra,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.5, 2.5))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run(command(sample, out) + ["--resume"], check=True, capture_output=True)
    assert tars(out) == tars(
        tmp_path / "whole"
    )  # same documents, same bytes: none missing, none twice
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert validate_shards(str(out)).ok


def test_full_disk_is_a_clear_error_and_keeps_committed_units(
    sample: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    original, calls = ShardWriter._add_member, {"n": 0}

    def disk_fills_up(self, name: str, data: bytes) -> None:
        calls["n"] += 1
        if self.prefix == "shard_3":
            raise OSError(errno.ENOSPC, "No space left on device", str(self._tmp))
        original(self, name, data)

    monkeypatch.setattr(ShardWriter, "_add_member", disk_fills_up)
    args = [
        "convert",
        "mmc4",
        "--docs",
        sample["docs"],
        "--images",
        sample["images"],
        "--out",
        str(tmp_path / "o"),
        "--processes",
        "1",
        "--no-progress",
    ]
    assert cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0]
    done = sorted(p.stem for p in (tmp_path / "o" / "_done").glob("*.json"))
    assert done == ["shard_0", "shard_1", "shard_2"]
    assert not list((tmp_path / "o").glob("*.tmp")) and not list((tmp_path / "o").glob("shard_3-*"))
    monkeypatch.setattr(ShardWriter, "_add_member", original)
    assert cli([*args, "--resume"]) == 0
    clean = [a if a != str(tmp_path / "o") else str(tmp_path / "clean") for a in args]
    assert cli(clean) == 0
    assert tars(tmp_path / "o") == tars(tmp_path / "clean")
