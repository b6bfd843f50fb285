"""MMC4 document shards as plain, gzip and zstd jsonl files: the same output as their zips, every
line counted, cut-off, corrupt and bomb files counted unit rejects, --resume redoes them."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zstandard

from flamingo_data.converters import mmc4
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.errors import NothingWritten
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions

WRITERS = {
    "jsonl": lambda data: data,
    "jsonl.gz": lambda data: gzip.compress(data, mtime=0),
    "jsonl.zst": lambda data: zstandard.ZstdCompressor(write_checksum=True).compress(data),
}


def convert(docs: str, images: str, out: Path, resume: bool = False, processes: int = 1) -> dict:
    stats = convert_mmc4(
        docs,
        Mmc4Options(images=images),
        RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True, resume=resume),
        execution=Execution(processes=processes, progress=False),
    )
    return stats.to_json()


def outputs(out: Path) -> dict[str, bytes]:
    names = [p for p in sorted(out.iterdir()) if p.suffix == ".tar" or p.name == "sizes.json"]
    return {p.name: p.read_bytes() for p in names}


def unit_rejects(out: Path) -> dict[str, str]:
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return {r["unit"]: r["reason"] for r in rejects if r["kind"] == "units"}


def released_sample(tmp_path: Path, n_shards: int = 3) -> tuple[dict, list[bytes]]:
    """The sample's zips renamed as released (``docs_shard_<n>_v2.jsonl.zip``), each zip's jsonl
    given blank lines, and each zip's jsonl bytes."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=n_shards, docs_per_shard=4, missing_rate=0.1, seed=3
    )
    docs = tmp_path / "zips"
    docs.mkdir()
    contents = []
    for shard in range(n_shards):
        source = Path(sample["docs"]).parent / f"shard_{shard}.zip"
        lines = zipfile.ZipFile(source).read(f"shard_{shard}.jsonl").splitlines()
        data = b"\n".join([b"", lines[0], b"  ", *lines[1:], b"{bad"]) + b"\n"
        with zipfile.ZipFile(docs / f"docs_shard_{shard}_v2.jsonl.zip", "w") as zf:
            zf.writestr(f"docs_shard_{shard}_v2.jsonl", data)
        contents.append(data)
    return sample, contents


def test_jsonl_gz_and_zst_shards_write_the_bytes_their_zips_write(tmp_path: Path) -> None:
    """A docs folder of the three kinds, shard numbers in the released names: the same tars,
    sizes.json and counts as the zips, and keys number lines from 1, blank ones included."""
    sample, contents = released_sample(tmp_path)
    from_zips = convert(str(tmp_path / "zips"), sample["images"], tmp_path / "out_zip")
    streams = tmp_path / "streams"
    streams.mkdir()
    for shard, kind in enumerate(WRITERS):
        path = streams / f"docs_shard_{shard}_v2.{kind}"
        path.write_bytes(WRITERS[kind](contents[shard]))
    (streams / "notes.txt").write_text("not a shard")
    from_streams = convert(str(streams), sample["images"], tmp_path / "out_streams", processes=2)
    assert from_streams["counts"] == from_zips["counts"]
    assert from_zips["counts"]["documents"]["in"] == 15
    assert from_streams["reasons"] == from_zips["reasons"] == {"documents": {"bad_json": 3}}
    assert outputs(tmp_path / "out_streams") == outputs(tmp_path / "out_zip")
    assert len(outputs(tmp_path / "out_zip")) == 4
    rejects = (tmp_path / "out_streams" / "rejects.jsonl").read_text()
    assert '"key": "docs_shard_1_v2-0000007"' in rejects  # the last line, blank lines counted


def test_a_brace_pattern_and_the_indexed_folders_take_the_shard_number(tmp_path: Path) -> None:
    """``docs_shard_2_v2.jsonl.gz`` reads its images from ``images/2`` even listed alone."""
    sample, contents = released_sample(tmp_path)
    path = tmp_path / "docs_shard_2_v2.jsonl.gz"
    path.write_bytes(WRITERS["jsonl.gz"](contents[2]))
    stats = convert(
        str(tmp_path / "docs_shard_{2,7}_v2.jsonl.gz"), sample["images"], tmp_path / "o"
    )
    assert stats["counts"]["units"]["layout_indexed"] == 1
    assert stats["counts"]["units"]["missing_input"] == 1
    assert stats["counts"]["documents"]["written"] == 4


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst"])
def test_a_cut_off_file_keeps_its_first_lines_and_resume_redoes_it(
    kind: str, tmp_path: Path
) -> None:
    """A cut-off file of 50 gzip members or zstd frames one after another (each a copy of the
    same lines: new keys, the same images) converts the lines before the break."""
    sample, contents = released_sample(tmp_path, n_shards=1)
    path = tmp_path / "docs" / f"docs_shard_0_v2.{kind}"
    path.parent.mkdir()
    whole = b"".join(WRITERS[kind](contents[0]) for _ in range(50))
    path.write_bytes(whole[: len(whole) // 2 + 10])  # inside a member or frame
    cut = convert(str(path.parent), sample["images"], tmp_path / "out")
    assert unit_rejects(tmp_path / "out") == {"docs_shard_0_v2": "truncated_stream"}
    assert 0 < cut["counts"]["documents"]["in"] < 250

    path.write_bytes(whole)  # the download, redone
    repaired = convert(str(path.parent), sample["images"], tmp_path / "out", resume=True)
    assert repaired["counts"]["documents"]["in"] == 250
    assert "units" not in repaired["reasons"]
    convert(str(path.parent), sample["images"], tmp_path / "clean")
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")


@pytest.mark.parametrize(
    ("kind", "damage"),
    [
        ("jsonl.gz", lambda data: data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]),  # its CRC-32
        ("jsonl.gz", lambda data: b"<html>404 not found</html>"),
        ("jsonl.zst", lambda data: data[:-4] + bytes([data[-4] ^ 1]) + data[-3:]),  # checksum
        ("jsonl.zst", lambda data: b"<html>404 not found</html>"),
        ("jsonl.gz", lambda data: b""),  # a download that never started
        ("jsonl.zst", lambda data: b""),
    ],
    ids=["gz-crc", "gz-html", "zst-checksum", "zst-html", "gz-empty", "zst-empty"],
)
def test_a_file_failing_its_format_checks_is_refused_whole(kind, damage, tmp_path: Path) -> None:
    sample, contents = released_sample(tmp_path, n_shards=2)
    docs = tmp_path / "docs"
    docs.mkdir()
    for shard in range(2):
        (docs / f"docs_shard_{shard}_v2.{kind}").write_bytes(WRITERS[kind](contents[shard]))
    bad = docs / f"docs_shard_0_v2.{kind}"
    bad.write_bytes(damage(bad.read_bytes()))
    stats = convert(str(docs), sample["images"], tmp_path / "out")
    assert unit_rejects(tmp_path / "out") == {"docs_shard_0_v2": "unreadable_stream"}
    assert stats["counts"]["documents"]["in"] == 5  # shard 1 only


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst"])
def test_a_decompression_bomb_is_refused_unread(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good document, then blank lines inflating over 100 times the file's size past the cap:
    compression_bomb, and not even the good document is converted (as for a zip)."""
    monkeypatch.setattr(mmc4, "BOMB_MIN_BYTES", 2**20)
    sample, contents = released_sample(tmp_path, n_shards=1)
    docs = tmp_path / "docs"
    docs.mkdir()
    path = docs / f"docs_shard_0_v2.{kind}"
    path.write_bytes(WRITERS[kind](contents[0] + b"\n" * (4 * 2**20)))
    assert path.stat().st_size * 100 < 4 * 2**20
    with pytest.raises(NothingWritten):
        convert(str(docs), sample["images"], tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["reasons"]["units"] == {"compression_bomb": 1}
    assert "documents" not in stats["counts"]


def test_a_long_line_in_a_zst_file_is_counted_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmc4, "MAX_LINE_BYTES", 4096)
    sample, contents = released_sample(tmp_path, n_shards=1)
    docs = tmp_path / "docs"
    docs.mkdir()
    data = b'{"url": "' + b"x" * 10_000 + b'"}\n' + contents[0]
    (docs / "docs_shard_0_v2.jsonl.zst").write_bytes(WRITERS["jsonl.zst"](data))
    stats = convert(str(docs), sample["images"], tmp_path / "out")
    assert stats["reasons"]["documents"] == {"line_too_long": 1, "bad_json": 1}
    assert stats["counts"]["documents"]["in"] == 6


def test_zstandard_is_imported_only_when_a_zst_file_is_read(tmp_path: Path) -> None:
    sample, contents = released_sample(tmp_path, n_shards=1)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "docs_shard_0_v2.jsonl.zst").write_bytes(WRITERS["jsonl.zst"](contents[0]))
    imported = {}
    for name, docs in (("zip", tmp_path / "zips"), ("zst", tmp_path / "docs")):
        code = (
            "import sys; from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4; "
            "from flamingo_data.run.units import RunOptions; "
            "from flamingo_data.run.executors import Execution; "
            f"convert_mmc4({str(docs)!r}, Mmc4Options(images={sample['images']!r}), "
            f"RunOptions(out_dir={str(tmp_path / name)!r}, converter='mmc4'), "
            "execution=Execution(processes=1, progress=False)); "
            "print('zstandard' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        imported[name] = done.stdout.split()[-1]
    assert imported == {"zip": "False", "zst": "True"}
