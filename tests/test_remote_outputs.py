"""Remote outputs through fsspec: a unit is staged locally, its shards uploaded, its marker last.

memory:// lives in one process, so multi-process runs use ``local://`` (fsspec's local filesystem
reached through the remote code path)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
import pytest

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.samples import write_mmc4_sample
from flamingo_data.units import RunOptions, Unit, UnitContext, run_unit
from flamingo_data.validate import validate_shards


def convert(sample: dict, out: str, processes: int = 1, resume: bool = False) -> dict:
    run = RunOptions(out_dir=out, converter="mmc4", write_rejects=True, resume=resume)
    options = Mmc4Options(images=sample["images"])
    stats = convert_mmc4(sample["docs"], options, run, processes=processes, progress=False)
    return stats.to_json()


def files(url: str) -> dict[str, bytes]:
    """Every file under ``url`` by relative path (local folders as ``local://`` or plain paths)."""
    fs, root = fsspec.core.url_to_fs(url)
    found = fs.find(root)
    return {p[len(root.rstrip("/")) + 1 :]: fs.cat_file(p) for p in found}


@pytest.fixture(autouse=True)
def own_tmp(tmp_path: Path, monkeypatch) -> Path:
    """Staging folders go under this test's own temp dir, so leftovers are this test's alone."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def staged(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.is_file()]


@pytest.fixture
def sample(tmp_path: Path) -> dict:
    return write_mmc4_sample(
        tmp_path / "src", n_shards=3, docs_per_shard=8, missing_rate=0.2, seed=3
    )


@pytest.fixture
def memory_out():
    url = "memory://out-bucket/shards"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists("/out-bucket"):
        fs.rm("/out-bucket", recursive=True)


def test_memory_out_equals_local_out_byte_for_byte(sample, tmp_path, memory_out) -> None:
    convert(sample, str(tmp_path / "local"))
    stats = convert(sample, memory_out)
    local, uploaded = files(str(tmp_path / "local")), files(memory_out)
    assert {n for n in local if n.endswith(".tar")} and uploaded == local
    assert stats["counts"]["units"]["done"] == 3
    assert not staged(Path(tempfile.gettempdir()))  # stages removed


def test_two_processes_to_a_remote_filesystem_equal_local(sample, tmp_path) -> None:
    convert(sample, str(tmp_path / "local"))
    convert(sample, f"local://{tmp_path / 'remote'}", processes=2)
    assert files(str(tmp_path / "remote")) == files(str(tmp_path / "local"))
    assert validate_shards(str(tmp_path / "remote")).ok


def test_resume_against_a_remote_out_redoes_only_unfinished_units(sample, memory_out) -> None:
    convert(sample, memory_out)
    before = files(memory_out)
    fs = fsspec.filesystem("memory")
    fs.rm_file("/out-bucket/shards/_done/shard_1.json")  # crashed before its marker went up
    fs.pipe_file("/out-bucket/shards/shard_0-00000.tar", b"left alone when resuming")
    stats = convert(sample, memory_out, resume=True)
    after = files(memory_out)
    assert after["shard_0-00000.tar"] == b"left alone when resuming"  # finished unit skipped
    assert after["shard_1-00000.tar"] == before["shard_1-00000.tar"]  # redone, same bytes
    assert {k: v for k, v in after.items() if k != "shard_0-00000.tar"} == {
        k: v for k, v in before.items() if k != "shard_0-00000.tar"
    }
    assert stats["counts"]["units"]["done"] == 3


def test_a_failing_unit_uploads_nothing_and_leaves_no_stage(memory_out) -> None:
    def fails_midway(unit: Unit, ctx: UnitContext) -> None:
        ctx.write("k-1", {"json": b"{}"})
        raise OSError("source vanished")

    options = RunOptions(out_dir=memory_out, converter="test")
    with pytest.raises(OSError, match="source vanished"):
        run_unit(Unit("failing", "src", 0), fails_midway, options)
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/out-bucket/shards/_done/failing.json")
    assert not fs.glob("/out-bucket/shards/failing-*")
    assert not staged(Path(tempfile.gettempdir()))


def test_converters_without_remote_out_say_so(tmp_path, capsys) -> None:
    from flamingo_data.cli import main as cli

    chat = tmp_path / "seqs.jsonl"
    chat.write_text("")
    code = cli(["convert", "chatgpt", "--sequences", str(chat), "--out", "memory://x/out"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remote --out" in err[0]


def test_cli_writes_to_a_remote_out(sample, tmp_path, memory_out, monkeypatch) -> None:
    from flamingo_data.cli import main as cli

    monkeypatch.chdir(tmp_path)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    assert cli([*args, "--out", memory_out, "--processes", "1", "--no-progress"]) == 0
    assert cli([*args, "--out", str(tmp_path / "local"), "--processes", "1", "--no-progress"]) == 0
    assert files(memory_out) == files(str(tmp_path / "local"))
    assert not (tmp_path / "memory:").exists()  # no stray local folder named after the url
