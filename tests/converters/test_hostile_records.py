"""Every input record is read exactly once: duplicate zip members, members failing their CRC,
inputs named twice, blank-line bombs, and gaps in MMC4 shard numbering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.storage.specs import expand_specs


def convert(docs: str | list[str], images: str, out: Path, **options) -> dict:
    stats = convert_mmc4(
        docs,
        Mmc4Options(images=images, **options),
        RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True),
        execution=Execution(processes=1, progress=False),
    )
    return stats.to_json()


def written(out: Path) -> dict[str, dict]:
    """Key -> record of every record in the shards; a key written twice fails the test."""
    records: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key = member.name.removesuffix(".json")
                assert key not in records, f"{key} written twice"
                records[key] = json.loads(tar.extractfile(member).read())
    return records


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def balanced(stats: dict, category: str = "documents") -> bool:
    counts = stats["counts"][category]
    return counts["in"] == counts.get("written", 0) + counts.get("rejected", 0)


def sample_lines(tmp_path: Path, n_shards: int = 1, docs: int = 6) -> tuple[dict, list[bytes]]:
    """A sample whose every image exists, and the jsonl lines of its zips in order."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=n_shards, docs_per_shard=docs, missing_rate=0.0, seed=3
    )
    lines: list[bytes] = []
    for shard in range(n_shards):
        path = Path(sample["docs"]).parent / f"shard_{shard}.zip"
        lines += zipfile.ZipFile(path).read(f"shard_{shard}.jsonl").splitlines()
    return sample, lines


def write_zip(path: Path, members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED):
    """A zip holding ``members`` in this order, names repeated as given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, and writes it
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, data in members:
                zf.writestr(name, data)


# 1. members of one name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ["shard_0.jsonl", "shard_0.jsonl"],
        ["shard_0.jsonl", "shard_0.jsonl", "shard_0.jsonl"],
        ["a.jsonl", "shard_0.jsonl", "a.jsonl"],
        ["x/d.jsonl", "x/d.jsonl", "d.JSONL"],
    ],
)
@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_members_of_one_name_are_each_read_once(
    tmp_path: Path, names: list[str], method: int
) -> None:
    sample, lines = sample_lines(tmp_path, docs=2 * len(names))
    parts = [b"\n".join(lines[2 * i : 2 * i + 2]) + b"\n" for i in range(len(names))]
    write_zip(
        Path(sample["docs"]).parent / "shard_0.zip", list(zip(names, parts, strict=True)), method
    )
    stats = convert(sample["docs"], sample["images"], tmp_path / "out")
    records = written(tmp_path / "out")
    assert sorted(r["url"] for r in records.values()) == sorted(
        json.loads(line)["url"] for line in lines
    )
    assert stats["counts"]["documents"] == {"in": len(lines), "written": len(lines)}
    again = tmp_path / "again"
    convert(sample["docs"], sample["images"], again)
    assert sorted(written(again)) == sorted(records)  # keys stable across runs


def test_a_one_member_zip_keeps_its_keys(tmp_path: Path) -> None:
    """The ordinary zip: keys are ``<unit>-<line>``, blank lines counted in the numbering."""
    sample, lines = sample_lines(tmp_path, docs=3)
    data = lines[0] + b"\n\n  \n" + lines[1] + b"\n" + lines[2]  # no final newline
    write_zip(Path(sample["docs"]).parent / "shard_0.zip", [("shard_0.jsonl", data)])
    convert(sample["docs"], sample["images"], tmp_path / "out")
    assert sorted(written(tmp_path / "out")) == [
        "shard_0-0000001",
        "shard_0-0000004",
        "shard_0-0000005",
    ]


# 2. a member that fails its CRC ---------------------------------------------------------------------


def damage_stored(path: Path, needle: bytes) -> None:
    """Flip one character of ``needle`` in the file's bytes: the text stays JSON, its CRC fails."""
    data = bytearray(path.read_bytes())
    at = data.index(needle) + len(needle) // 2
    data[at] = ord("Q") if data[at] != ord("Q") else ord("R")
    path.write_bytes(bytes(data))


def damage_crc_field(path: Path, member: str) -> None:
    """Change the member's CRC-32 in its local header and its central directory entry."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename == member)
    old = info.CRC.to_bytes(4, "little")
    new = (info.CRC ^ 0x5A5A5A5A).to_bytes(4, "little")
    data = path.read_bytes()
    assert data.count(old) == 2
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("damaged", [0, 1, 2])
@pytest.mark.parametrize("how", ["byte", "crc_field"])
def test_a_member_failing_its_crc_writes_none_of_its_documents(
    tmp_path: Path, damaged: int, how: str
) -> None:
    sample, lines = sample_lines(tmp_path, docs=9)
    path = Path(sample["docs"]).parent / "shard_0.zip"
    names = ["a.jsonl", "b.jsonl", "c.jsonl"]
    parts = [b"\n".join(lines[3 * i : 3 * i + 3]) + b"\n\n" for i in range(3)]
    write_zip(path, list(zip(names, parts, strict=True)), zipfile.ZIP_STORED)
    bad_urls = {json.loads(line)["url"] for line in lines[3 * damaged : 3 * damaged + 3]}
    if how == "byte":
        damage_stored(path, json.loads(lines[3 * damaged + 1])["url"].encode())
    else:
        damage_crc_field(path, names[damaged])
    stats = convert(sample["docs"], sample["images"], tmp_path / "out")
    urls = {r["url"] for r in written(tmp_path / "out").values()}
    good = {json.loads(line)["url"] for line in lines} - bad_urls
    assert urls == good
    assert stats["counts"]["documents"] == {"in": 9, "written": 6, "rejected": 3}
    assert stats["reasons"]["documents"] == {"bad_crc": 3}
    assert stats["reasons"]["units"] == {"bad_crc": 1}  # so that --resume redoes the zip
    keys = sorted(r["key"] for r in rejects(tmp_path / "out") if r["kind"] == "documents")
    first = 4 * damaged + 1  # each member is 3 lines and a blank one
    assert keys == [f"shard_0-{n:07d}" for n in range(first, first + 3)]


# 3. one file named twice ---------------------------------------------------------------------------


def spec_variants(folder: Path, name: str, pattern: str) -> list[list[str]]:
    """Ways to name the file ``folder/name`` twice; ``pattern`` is a glob matching it."""
    link = folder.parent / f"link-{name}"
    if not link.exists():
        link.symlink_to(folder / name)
    return [
        [str(folder / pattern), str(folder / name)],
        [str(folder / name), f"{folder}/./{name}"],
        [str(folder / name), str(link)],
        [f"{folder}/../{folder.name}/{name}", str(folder / name)],
        [str(folder), str(folder / name)],
        [f"{folder}/{{{pattern},{name}}}"],  # a brace pattern overlapping a glob
        [f"{folder}/{{{name},{name}}}"],
    ]


def test_expand_specs_gives_each_file_once_in_first_order(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.zip", "b.zip", "c.zip"):
        (folder / name).write_bytes(b"x")
    for specs in spec_variants(folder, "b.zip", "*.zip"):
        duplicates: list[str] = []
        found = expand_specs(specs, folder_suffix=".zip", keep_missing=True, duplicates=duplicates)
        real = [os.path.realpath(p) for p in found]
        assert len(real) == len(set(real)), specs
        assert duplicates, specs
    duplicates = []
    found = expand_specs([str(folder / "b.zip"), str(folder / "*.zip")], duplicates=duplicates)
    assert found == [str(folder / n) for n in ("b.zip", "a.zip", "c.zip")]  # first occurrence
    assert duplicates == [str(folder / "b.zip")]


def test_remote_names_of_one_object_are_one() -> None:
    duplicates: list[str] = []
    names = [
        "memory://b/x/a.zip",
        "memory://b/x//a.zip",
        "memory://b/x/./a.zip",
        "memory://b/x/A.zip",
    ]
    found = expand_specs(names, keep_missing=True, duplicates=duplicates)
    assert found == ["memory://b/x/a.zip", "memory://b/x/A.zip"]
    assert duplicates == names[1:3]


@pytest.mark.parametrize("variant", range(7))
def test_mmc4_converts_a_zip_named_twice_once(tmp_path: Path, variant: int) -> None:
    sample, lines = sample_lines(tmp_path, n_shards=2, docs=3)
    folder = Path(sample["docs"]).parent
    specs = spec_variants(folder, "shard_1.zip", "shard_*.zip")[variant]
    stats = convert(specs + [str(folder / "shard_0.zip")], sample["images"], tmp_path / "out")
    urls = sorted(r["url"] for r in written(tmp_path / "out").values())
    assert urls == sorted(json.loads(line)["url"] for line in lines)
    assert stats["counts"]["units"]["duplicate_input"] >= 1
    assert stats["counts"]["documents"] == {"in": 6, "written": 6}


@pytest.mark.parametrize("variant", range(7))
def test_conversations_convert_a_file_named_twice_once(tmp_path: Path, variant: int) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(make_image(1))
    items = [
        {
            "id": f"i{n}",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": f"<image> q{n}"},
                {"from": "gpt", "value": f"a{n}"},
            ],
        }
        for n in range(3)
    ]
    (folder / "one.json").write_text(json.dumps(items))
    specs = spec_variants(folder, "one.json", "*.json")[variant]
    stats = convert_conversations(
        specs,
        ConversationOptions(images=str(tmp_path / "images")),
        RunOptions(out_dir=str(tmp_path / "out"), converter="conversations"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["counts"]["documents"]["written"] == 3
    assert stats["counts"]["units"]["duplicate_input"] == 1
    assert len(written(tmp_path / "out")) == 3


@pytest.mark.parametrize("variant", [0])  # each run downloads; the forms are tested above
def test_chatgpt_converts_a_file_named_twice_once(
    tmp_path: Path, http_server, variant: int
) -> None:
    http_server.add_image("1.jpg", seed=1)
    folder = tmp_path / "seq"
    folder.mkdir()
    sequences = [
        {
            "example": f"s{n} _!_IMAGE1_!_",
            "image_map": {"_!_IMAGE1_!_": {"url": http_server.url("1.jpg")}},
        }
        for n in range(2)
    ]
    (folder / "seq.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sequences))
    specs = spec_variants(folder, "seq.jsonl", "*.jsonl")[variant]
    stats = convert_chatgpt(
        specs,
        ChatGptOptions(download=DownloadOptions(processes=1, threads=2, timeout=5, retries=0)),
        RunOptions(out_dir=str(tmp_path / "out"), converter="chatgpt"),
        execution=Execution(processes=1, progress=False),
    ).to_json()
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}
    assert stats["counts"]["units"]["duplicate_input"] == 1
    assert len(written(tmp_path / "out")) == 2


# 4. blank lines and bombs ---------------------------------------------------------------------------

CONVERT_IN_CHILD = (
    "import sys; from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4; "
    "from flamingo_data.run.units import RunOptions; "
    "from flamingo_data.run.executors import Execution; "
    "convert_mmc4(sys.argv[1], Mmc4Options(images=sys.argv[2]), "
    "RunOptions(out_dir=sys.argv[3], converter='mmc4', write_rejects=True), "
    "execution=Execution(processes=1, progress=False))"
)


def convert_in_child(sample: dict, out: Path) -> dict:
    """Convert in a fresh process that must finish within a generous 60 s (a hang guard)."""
    subprocess.run(
        [sys.executable, "-c", CONVERT_IN_CHILD, sample["docs"], sample["images"], str(out)],
        check=True,
        timeout=60,
    )
    return json.loads((out / "stats.json").read_text())


def random_whitespace(n_bytes: int, seed: int) -> bytes:
    """Blank lines of mixed whitespace, hard to compress (so no bomb: a plain, large member)."""
    alphabet = np.frombuffer(b" \t\r\n\n\n\x0b\x0c", dtype=np.uint8)
    return alphabet[np.random.default_rng(seed).integers(0, len(alphabet), n_bytes)].tobytes()


@pytest.mark.parametrize("where", ["between", "before", "after"])
def test_blank_lines_cost_nothing_and_are_not_documents(tmp_path: Path, where: str) -> None:
    """24 MiB of whitespace lines (about 10 M of them) around two documents."""
    sample, lines = sample_lines(tmp_path, docs=2)
    blank = random_whitespace(24 * 2**20, seed=len(where)) + b"\n"
    body = {
        "between": lines[0] + b"\n" + blank + lines[1] + b"\n",
        "before": blank + lines[0] + b"\n" + lines[1] + b"\n",
        "after": lines[0] + b"\n" + lines[1] + b"\n" + blank,
    }[where]
    write_zip(  # stored: random whitespace deflates slowly, and to no bomb
        Path(sample["docs"]).parent / "shard_0.zip", [("shard_0.jsonl", body)], zipfile.ZIP_STORED
    )
    stats = convert_in_child(sample, tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}
    numbers = [body.count(b"\n", 0, body.index(line)) + 1 for line in lines]
    assert sorted(written(tmp_path / "out")) == [f"shard_0-{n:07d}" for n in numbers]


@pytest.mark.parametrize(
    "filler", [b"\n", b" \n", b"\r\n", b"1\n", b"{}\n"], ids=["nl", "space", "crlf", "one", "obj"]
)
def test_a_zip_bomb_of_short_lines_is_refused_unread(tmp_path: Path, filler: bytes) -> None:
    """A few KB of zip inflating to 40 MiB of short lines: refused as a unit, not read line by
    line; the other zip of the run is converted."""
    sample, lines = sample_lines(tmp_path, n_shards=2, docs=2)
    bomb = Path(sample["docs"]).parent / "shard_0.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("a.jsonl", "w") as out:
        out.write(lines[0] + b"\n")
        chunk = filler * (2**20 // len(filler))
        for _ in range(40):
            out.write(chunk)
    assert bomb.stat().st_size < 200_000
    stats = convert_in_child(sample, tmp_path / "out")
    assert stats["reasons"]["units"] == {"compression_bomb": 1}
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}  # shard_1's
    [reject] = [r for r in rejects(tmp_path / "out") if r["kind"] == "units"]
    assert reject["unit"] == "shard_0" and "compressed" in reject["detail"]


READ_IN_CHILD = (
    "import sys; from flamingo_data.converters.jsonchunks import read_items; "
    "items = [(i, item) for i, item, _e in read_items(sys.argv[1])]; "
    "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
    "print(items, int(peak.split()[1]) // 1024)"
)


@pytest.mark.parametrize("blank", ["\t \n", "  \r\n", "   \n"])
def test_json_inputs_skip_blank_lines_without_holding_them(tmp_path: Path, blank: str) -> None:
    """48 MiB of blank lines in a JSONL file (the input of conversations and chatgpt): no items,
    and memory near the file's own size, not a string per line."""
    path = tmp_path / "x.jsonl"
    filler = blank * (24 * 2**20 // len(blank))
    path.write_text('{"id": "a"}\n' + filler + '{"id": "b"}\n' + filler, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", READ_IN_CHILD, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    items, peak_mb = done.stdout.rsplit(" ", 1)
    assert items == "[(0, {'id': 'a'}), (1, {'id': 'b'})]"
    assert int(peak_mb) < 400


# 5. gaps in the shard numbering ----------------------------------------------------------------------


def gapped_sample(tmp_path: Path, names: str) -> tuple[dict, list[bytes]]:
    """Shards 0..3 with 1 gone (zip and images); zips renamed after ``names`` (a format string)."""
    sample, lines = sample_lines(tmp_path, n_shards=4, docs=3)
    folder = Path(sample["docs"]).parent
    (folder / "shard_1.zip").unlink()
    for shard in (0, 2, 3):
        (folder / f"shard_{shard}.zip").rename(folder / names.format(shard))
    images = Path(sample["images"])
    for image in (images / "1").iterdir():
        image.unlink()
    (images / "1").rmdir()
    return sample, lines[:3] + lines[6:]


@pytest.mark.parametrize("names", ["shard_{}.zip", "docs_shard_{}_v2.jsonl.zip", "{}.zip"])
@pytest.mark.parametrize("how", ["folder", "glob", "brace"])
def test_a_gap_in_shard_numbers_does_not_shift_image_folders(
    tmp_path: Path, names: str, how: str
) -> None:
    sample, lines = gapped_sample(tmp_path, names)
    folder = Path(sample["docs"]).parent
    docs = {
        "folder": str(folder),
        "glob": str(folder / names.format("*")),
        "brace": str(folder / names.format("{0..3}")),
    }[how]
    stats = convert(docs, sample["images"], tmp_path / "out", layout="indexed")
    assert stats["counts"]["documents"] == {"in": 9, "written": 9}
    urls = sorted(r["url"] for r in written(tmp_path / "out").values())
    assert urls == sorted(json.loads(line)["url"] for line in lines)


@pytest.mark.parametrize("layout", ["indexed", "auto"])
@pytest.mark.parametrize("how", ["folder", "glob"])
def test_a_folder_of_unnumbered_zips_is_refused_with_one_line(
    tmp_path: Path, layout: str, how: str
) -> None:
    sample, _lines = sample_lines(tmp_path, n_shards=2, docs=2)
    folder = Path(sample["docs"]).parent
    for shard, name in ((0, "first.zip"), (1, "second.zip")):
        (folder / f"shard_{shard}.zip").rename(folder / name)
    docs = str(folder) if how == "folder" else str(folder / "*.zip")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flamingo_data",
            "convert",
            "mmc4",
            "--docs",
            docs,
            "--images",
            sample["images"],
            "--out",
            str(tmp_path / "out"),
            "--image-layout",
            layout,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "brace pattern" in message
    assert not list((tmp_path / "out").glob("*.tar"))


def test_unnumbered_zips_listed_one_by_one_keep_their_positions(tmp_path: Path) -> None:
    sample, lines = sample_lines(tmp_path, n_shards=2, docs=2)
    folder = Path(sample["docs"]).parent
    for shard, name in ((0, "first.zip"), (1, "second.zip")):
        (folder / f"shard_{shard}.zip").rename(folder / name)
    stats = convert(str(folder / "{first,second}.zip"), sample["images"], tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 4, "written": 4}


def test_resume_redoes_a_zip_whose_member_failed_its_crc(tmp_path: Path) -> None:
    """Once the damaged download is redone, --resume converts it: the output equals a clean run."""
    sample, lines = sample_lines(tmp_path, n_shards=2, docs=3)
    path = Path(sample["docs"]).parent / "shard_1.zip"
    write_zip(path, [("shard_1.jsonl", b"\n".join(lines[3:]) + b"\n")], zipfile.ZIP_STORED)
    whole = path.read_bytes()
    damage_stored(path, json.loads(lines[4])["url"].encode())

    def run(out: Path, resume: bool) -> dict:
        return convert_mmc4(
            sample["docs"],
            Mmc4Options(images=sample["images"]),
            RunOptions(out_dir=str(out), converter="mmc4", resume=resume),
            execution=Execution(processes=1, progress=False),
        ).to_json()

    assert run(tmp_path / "out", resume=False)["reasons"]["documents"] == {"bad_crc": 3}
    path.write_bytes(whole)
    assert run(tmp_path / "out", resume=True)["counts"]["documents"] == {"in": 6, "written": 6}
    run(tmp_path / "clean", resume=False)
    for name in ("shard_0-00000.tar", "shard_1-00000.tar", "sizes.json", "stats.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
