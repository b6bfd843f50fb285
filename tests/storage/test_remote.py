"""Remote inputs through fsspec: MMC4 zips and images read from memory:// give the same shards as local files."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import fsspec
import zstandard

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.storage.specs import expand_specs


def upload(local: Path, url: str) -> None:
    fs = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_mmc4_from_memory_filesystem_matches_local(tmp_path: Path) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=6, seed=8)
    upload(tmp_path / "src", "memory://bucket/mmc4")
    assert expand_specs("memory://bucket/mmc4/docs/shard_{0..2}.zip") == [
        "memory://bucket/mmc4/docs/shard_0.zip",
        "memory://bucket/mmc4/docs/shard_1.zip",
    ]
    assert len(expand_specs("memory://bucket/mmc4/docs/*.zip")) == 2
    local = RunOptions(out_dir=str(tmp_path / "local"), converter="mmc4")
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        local,
        execution=Execution(processes=1, progress=False),
    )
    remote = RunOptions(out_dir=str(tmp_path / "remote"), converter="mmc4")
    stats = convert_mmc4(
        "memory://bucket/mmc4/docs/shard_{0..1}.zip",
        Mmc4Options(images="memory://bucket/mmc4/images"),
        remote,
        execution=Execution(processes=1, progress=False),
    )
    assert stats.get("documents", "written") > 0
    read = lambda out: {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}  # noqa: E731
    assert read(tmp_path / "remote") == read(tmp_path / "local")


def test_mmc4_jsonl_gz_and_zst_from_a_remote_folder_match_their_zips(tmp_path: Path) -> None:
    """A remote folder of compressed jsonl shards: sizes (the bomb cap) and reads through fsspec."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=6, seed=8)
    docs = Path(sample["docs"]).parent
    lines = [zipfile.ZipFile(docs / f"shard_{n}.zip").read(f"shard_{n}.jsonl") for n in range(2)]
    streams = tmp_path / "streams"
    streams.mkdir()
    (streams / "shard_0.jsonl.gz").write_bytes(gzip.compress(lines[0]))
    (streams / "shard_1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[1]))
    upload(streams, "memory://bucket/streams")
    upload(tmp_path / "src" / "images", "memory://bucket/streams-images")
    options = Mmc4Options(images="memory://bucket/streams-images")
    for out, docs_spec in (("zips", sample["docs"]), ("remote", "memory://bucket/streams")):
        convert_mmc4(
            docs_spec,
            options,
            RunOptions(out_dir=str(tmp_path / out), converter="mmc4"),
            execution=Execution(processes=1, progress=False),
        )
    read = lambda out: {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}  # noqa: E731
    assert read(tmp_path / "remote") == read(tmp_path / "zips")
    assert len(read(tmp_path / "zips")) == 2
