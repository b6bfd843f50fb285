"""Remote outputs through fsspec: a unit is staged locally, its shards uploaded, its marker last.

memory:// lives in one process, so multi-process runs use ``local://`` (fsspec's local filesystem
reached through the remote code path)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fsspec
import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions, Unit, UnitContext, run_unit


def convert(
    sample: dict, out: str, processes: int = 1, resume: bool = False, **kwargs: bool
) -> dict:
    rejects = kwargs.pop("write_rejects", True)
    run = RunOptions(out_dir=out, converter="mmc4", write_rejects=rejects, resume=resume)
    options = Mmc4Options(images=sample["images"])
    stats = convert_mmc4(
        sample["docs"],
        options,
        run,
        execution=Execution(processes=processes, progress=False),
        **kwargs,
    )
    return stats.to_json()


def upload(local: Path, url: str) -> None:
    """Copy a local folder into fsspec's in-memory filesystem."""
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(local).as_posix()}", path.read_bytes())


def files(url: str) -> dict[str, bytes]:
    """Every file under ``url`` by relative path (local folders as ``local://`` or plain paths)."""
    fs, root = fsspec.core.url_to_fs(url)
    found = fs.find(root)
    return {p[len(root.rstrip("/")) + 1 :]: fs.cat_file(p) for p in found}


@pytest.fixture(autouse=True)
def own_tmp(tmp_path: Path, monkeypatch) -> Path:
    """Staging and work folders go under this test's own temp dir: leftovers are this test's alone."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("FLAMINGO_DATA_WORK", str(tmp_path / "tmp" / "work"))
    return tmp_path / "tmp"


def staged(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.is_file()]


def without_sources(found: dict[str, bytes]) -> dict[str, bytes | dict]:
    """Markers name their input path, which differs between a local and a remote input."""
    markers = {n: json.loads(v) for n, v in found.items() if n.startswith("_done/")}
    for marker in markers.values():
        marker.pop("source")
    return {**found, **markers}


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
    for bucket in ("/out-bucket", "/in-bucket"):
        if fs.exists(bucket):
            fs.rm(bucket, recursive=True)


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


def test_overwrite_without_rejects_leaves_no_earlier_rejects_file(sample, memory_out) -> None:
    """rejects.jsonl describes the run beside it: --overwrite removes the earlier run's."""
    convert(sample, memory_out)
    assert "rejects.jsonl" in files(memory_out)
    convert(sample, memory_out, write_rejects=False, overwrite=True)
    after = files(memory_out)
    assert "rejects.jsonl" not in after and {n for n in after if n.endswith(".tar")}


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


def test_cli_writes_to_a_remote_out(sample, tmp_path, memory_out, monkeypatch) -> None:
    from flamingo_data.cli.main import main as cli

    monkeypatch.chdir(tmp_path)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    assert cli([*args, "--out", memory_out, "--processes", "1", "--no-progress"]) == 0
    assert cli([*args, "--out", str(tmp_path / "local"), "--processes", "1", "--no-progress"]) == 0
    assert files(memory_out) == files(str(tmp_path / "local"))
    assert not (tmp_path / "memory:").exists()  # no stray local folder named after the url


def test_conversations_from_and_to_remote_storage(tmp_path, memory_out) -> None:
    """Conversation files, images and output all remote; chunks live beside the remote shards."""
    from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
    from tests.converters.test_conversations import ITEMS, write_images

    write_images(tmp_path / "src" / "images")
    (tmp_path / "src" / "data.json").write_text(json.dumps(ITEMS, ensure_ascii=True))
    upload(tmp_path / "src", "memory://in-bucket/conv")

    def run(data: str, images: str, out: str) -> dict:
        options = ConversationOptions(images=images, as_="interleaved")
        run = RunOptions(out_dir=out, converter="conversations", write_rejects=True)
        stats = convert_conversations(
            data, options, run, chunk_size=3, execution=Execution(processes=1, progress=False)
        )
        return stats.to_json()

    local = run(
        str(tmp_path / "src" / "data.json"),
        str(tmp_path / "src" / "images"),
        str(tmp_path / "local"),
    )
    remote = run("memory://in-bucket/conv/data.json", "memory://in-bucket/conv/images", memory_out)
    assert remote == local and local["counts"]["documents"]["written"] > 0
    assert without_sources(files(memory_out)) == without_sources(files(str(tmp_path / "local")))
    assert not any("_chunks" in name for name in files(memory_out))  # scratch removed at the end


def test_remote_conversations_keep_their_chunks_in_the_bucket_until_they_succeed(
    tmp_path, memory_out, monkeypatch
) -> None:
    """An interrupted run leaves its chunks in the bucket's _work/ for --resume; the resumed run
    ends with the same files as an uninterrupted one, _work/ gone."""
    from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
    from flamingo_data.run import driver
    from tests.converters.test_conversations import ITEMS, write_images

    write_images(tmp_path / "src" / "images")
    (tmp_path / "src" / "data.json").write_text(json.dumps(ITEMS, ensure_ascii=True))

    def run(out: str, resume: bool = False) -> None:
        options = ConversationOptions(images=str(tmp_path / "src" / "images"))
        run = RunOptions(out_dir=out, converter="conversations", write_rejects=True, resume=resume)
        convert_conversations(
            str(tmp_path / "src" / "data.json"),
            options,
            run,
            chunk_size=3,
            execution=Execution(processes=1, progress=False),
        )

    real = driver.run_units

    def one_unit_then_stop(units, *rest) -> None:
        real(units[:1], *rest)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(driver, "run_units", one_unit_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(memory_out)
    assert any(name.startswith("_work/_chunks/") for name in files(memory_out))
    run(memory_out, resume=True)
    run(str(tmp_path / "local"))
    assert without_sources(files(memory_out)) == without_sources(files(str(tmp_path / "local")))
    assert not any(name.startswith("_work") for name in files(memory_out))


def test_validate_inspect_and_loader_read_remote_shards(sample, tmp_path, memory_out) -> None:
    from flamingo_data.check.inspect import inspect_shards
    from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer

    convert(sample, str(tmp_path / "local"))
    convert(sample, memory_out)
    remote_report, local_report = (
        validate_shards(memory_out),
        validate_shards(str(tmp_path / "local")),
    )
    assert remote_report.ok and remote_report.sizes == local_report.sizes
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/out-bucket/shards/sizes.json", b'{"shard_0-00000.tar": 999}')
    reasons = {f.reason for f in validate_shards(memory_out).failures}
    assert "count_mismatch" in reasons and "missing_from_sizes_json" in reasons
    validate_shards(memory_out, write_sizes=True)
    assert validate_shards(memory_out).ok  # sizes.json rewritten in the bucket
    assert (
        inspect_shards(memory_out).to_json()["documents"]
        == inspect_shards(str(tmp_path / "local")).to_json()["documents"]
    )

    def keys(spec: str) -> list[str]:
        config = LoaderConfig(batch_size=2, num_workers=0, image_size=32, shuffle_buffer=1)
        loader = build_loader([DatasetSpec("mmc4", spec)], make_tokenizer(None), config)
        return [k for batch in loader for k in batch["keys"]]

    assert keys(memory_out) == keys(str(tmp_path / "local")) and keys(memory_out)


def test_memory_out_with_worker_processes_is_an_error_not_an_empty_dataset(sample) -> None:
    """memory:// lives in one process: forked workers wrote their units into their own copies,
    and the driver merged no marker into an empty sizes.json, exit 0. Now the run stops."""
    from flamingo_data.run.units import RunIncomplete

    url = "memory://out-bucket/forked"
    with pytest.raises(RunIncomplete, match="3 of 3 finished units"):
        convert(sample, url, processes=2)
    assert not fsspec.filesystem("memory").exists("/out-bucket/forked/sizes.json")


def test_cli_file_url_out_writes_the_local_folder_it_names(sample, tmp_path, monkeypatch) -> None:
    """``--out file:///abs/out`` wrote into ``./file:/abs/out`` under the working folder."""
    from flamingo_data.cli.main import main as cli

    monkeypatch.chdir(tmp_path)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--processes", "2", "--no-progress", "--rejects"]
    assert cli([*args, "--out", f"file://{tmp_path / 'viaurl'}"]) == 0
    assert cli([*args, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "file:").exists()
    assert files(str(tmp_path / "viaurl")) == files(str(tmp_path / "plain"))
