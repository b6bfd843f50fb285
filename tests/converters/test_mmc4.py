"""MMC4 converter end to end: round trip, determinism, layouts, every bad input counted, resume after SIGKILL."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters import mmc4
from flamingo_data.converters.mmc4 import LayoutError, Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.images.stage import ImagePolicy
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from tests.images.test_images import png_bomb


def convert(sample: dict, out: Path, **options) -> dict:
    policy = options.pop("policy", ImagePolicy())
    processes = options.pop("processes", 1)
    stats = convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"], policy=policy, **options),
        RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True),
        execution=Execution(processes=processes, progress=False),
    )
    return stats.to_json()


def read_records(out: Path) -> dict[str, dict]:
    records = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                records[member.name.removesuffix(".json")] = json.loads(
                    tar.extractfile(member).read()
                )
    return records


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture
def sample(tmp_path: Path) -> dict:
    return write_mmc4_sample(
        tmp_path / "src", n_shards=3, docs_per_shard=10, missing_rate=0.15, seed=5
    )


def test_round_trip_equals_source_documents_and_image_bytes(sample: dict, tmp_path: Path) -> None:
    stats = convert(sample, tmp_path / "out")
    records = read_records(tmp_path / "out")
    images = Path(sample["images"])
    compared = 0
    for shard_no, docs in enumerate(sample["documents"]):
        for line, doc in enumerate(docs, start=1):
            key = f"shard_{shard_no}-{line:07d}"
            if key not in records:
                continue
            record = records[key]
            assert {k: record[k] for k in ("url", "text_list", "similarity_matrix")} == {
                k: doc[k] for k in ("url", "text_list", "similarity_matrix")
            }
            for info, source in zip(record["image_info"], doc["image_info"], strict=True):
                path = images / str(shard_no) / source["image_name"]
                assert {k: v for k, v in info.items() if k != "image_base64"} == source
                if path.exists():
                    assert base64.b64decode(info["image_base64"]) == path.read_bytes()
                else:
                    assert "image_base64" not in info
            compared += 1
    counts = stats["counts"]["documents"]
    assert compared == counts["written"] == len(records) and counts["in"] == counts[
        "written"
    ] + counts.get("rejected", 0)
    assert validate_shards(str(tmp_path / "out")).ok


def test_rerun_is_byte_identical_and_two_processes_match_one(sample: dict, tmp_path: Path) -> None:
    convert(sample, tmp_path / "a")
    convert(sample, tmp_path / "b")
    convert(sample, tmp_path / "c", processes=2)
    assert tar_bytes(tmp_path / "a") == tar_bytes(tmp_path / "b") == tar_bytes(tmp_path / "c")
    assert (tmp_path / "a" / "sizes.json").read_bytes() == (
        tmp_path / "c" / "sizes.json"
    ).read_bytes()


def test_flat_layout_and_auto_detection(tmp_path: Path) -> None:
    flat = write_mmc4_sample(
        tmp_path / "flat", n_shards=2, docs_per_shard=6, layout="flat", missing_rate=0.0
    )
    stats = convert(flat, tmp_path / "out")
    assert (
        stats["counts"]["units"]["layout_flat"] == 1
        and stats["counts"]["images"].get("missing", 0) == 0
    )
    stats = convert(flat, tmp_path / "out2", layout="flat")
    assert stats["counts"]["documents"]["written"] == 12


def test_wrong_layout_or_folder_fails_loudly(sample: dict, tmp_path: Path, capsys) -> None:
    with pytest.raises(LayoutError, match="nearly every image is missing"):
        convert(sample, tmp_path / "out", layout="flat")
    empty = tmp_path / "empty_images"
    empty.mkdir()
    code = cli(
        [
            "convert",
            "mmc4",
            "--docs",
            sample["docs"],
            "--images",
            str(empty),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2 and "nearly every image is missing" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))


def test_auto_detection_samples_every_zip_not_just_the_first(tmp_path: Path) -> None:
    """The first zip alone holds over 200 images; its folder is absent, the other two are there.
    Two thirds of the images are found, so the run goes on instead of stopping as if all were."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=3, docs_per_shard=150, missing_rate=0.0, image_size=(16, 16)
    )
    assert sum(len(d["image_info"]) for d in sample["documents"][0]) > 200
    for path in (Path(sample["images"]) / "0").iterdir():
        path.unlink()
    stats = convert(sample, tmp_path / "out")
    expected = {
        f"shard_{shard}-{line:07d}"
        for shard, docs in enumerate(sample["documents"])
        for line, doc in enumerate(docs, start=1)
        if shard > 0 and doc["image_info"]
    }
    assert set(read_records(tmp_path / "out")) == expected
    assert stats["counts"]["units"]["layout_indexed"] == 1
    assert stats["reasons"]["documents"] == {"no_images": 150}


def test_a_docs_folder_finds_zips_whatever_the_case_of_their_suffix(tmp_path: Path) -> None:
    """A zip saved on another system as SHARD_0.ZIP is an MMC4 zip too; it was skipped unsaid."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=4, missing_rate=0.0)
    docs_dir = Path(sample["docs"]).parent
    (docs_dir / "shard_0.zip").rename(docs_dir / "shard_0.ZIP")
    stats = convert({**sample, "docs": str(docs_dir)}, tmp_path / "out")
    assert stats["counts"]["units"]["done"] == 2
    assert stats["counts"]["documents"] == {"in": 8, "written": 8}


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_every_bad_input_is_a_counted_reasoned_skip(tmp_path: Path) -> None:
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=1, docs_per_shard=4, missing_rate=0.0, seed=9
    )
    docs_dir, images = Path(sample["docs"]).parent, Path(sample["images"]) / "0"
    good = json.loads(
        zipfile.ZipFile(docs_dir / "shard_0.zip").read("shard_0.jsonl").splitlines()[0]
    )
    (images / "corrupt.jpg").write_bytes(make_image(1)[:300])
    (images / "bomb.png").write_bytes(png_bomb())

    def variant(**changes) -> bytes:
        return json.dumps({**good, **changes}).encode()

    one = {**good["image_info"][0]}
    lines = [
        b"{not json",
        variant(similarity_matrix=[[0.1]]),
        variant(text_list=[]),
        variant(image_info=[{**one, "matched_text_index": 99}]),
        variant(
            image_info=[{**one, "image_name": "missing.jpg"}],
            similarity_matrix=[good["similarity_matrix"][0]],
        ),
        variant(
            image_info=[{**one, "image_name": "corrupt.jpg"}],
            similarity_matrix=[good["similarity_matrix"][0]],
        ),
        variant(
            image_info=[{**one, "image_name": "bomb.png"}],
            similarity_matrix=[good["similarity_matrix"][0]],
        ),
        variant(
            image_info=[{**one, "image_name": "../escape.jpg"}],
            similarity_matrix=[good["similarity_matrix"][0]],
        ),
        b"[1, 2, 3]",
    ]
    _zip(
        docs_dir / "shard_0.zip",
        {"a.jsonl": b"\n".join(lines) + b"\n", "b.jsonl": json.dumps(good).encode() + b"\n"},
    )
    (docs_dir / "shard_1.zip").write_bytes(b"PK\x03\x04 truncated zip")
    stats = convert(
        {"docs": str(docs_dir / "shard_{0..2}.zip"), "images": sample["images"]}, tmp_path / "out"
    )
    docs = stats["counts"]["documents"]
    assert docs == {"in": 10, "written": 1, "rejected": 9}
    assert stats["reasons"]["documents"] == {
        "bad_json": 1,
        "bad_matrix_shape": 1,
        "empty_text_list": 1,
        "bad_image_info": 1,
        "no_images": 4,
        "not_an_object": 1,
    }
    assert stats["reasons"]["images"] == {
        "undecodable": 1,
        "too_many_pixels": 1,
        "unsafe_image_name": 1,
    }
    assert stats["counts"]["images"]["missing"] == 1
    assert (
        stats["reasons"]["units"] == {"truncated_zip": 1}  # starts as a zip, no end
        and stats["counts"]["units"]["missing_input"] == 1
    )
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert (
        len(rejects) == 9 + 3 + 1 + 1
    )  # documents + rejected images + the unit + the missing image
    assert list(read_records(tmp_path / "out")) == [
        "shard_0-0000010"
    ]  # the line of b.jsonl: every member read


def test_keep_and_drop_options(sample: dict, tmp_path: Path) -> None:
    default = convert(sample, tmp_path / "a")["counts"]["documents"]
    keep = convert(sample, tmp_path / "b", keep_docs_without_images=True)["counts"]["documents"]
    strict = convert(sample, tmp_path / "c", drop_docs_with_missing_images=True)["counts"][
        "documents"
    ]
    assert keep["written"] == keep["in"] and keep.get("rejected", 0) == 0
    assert strict["written"] < default["written"] < keep["written"]


@pytest.mark.parametrize(
    ("options", "written", "reasons"),
    [
        ({}, "ABC", {"no_images": 2}),
        ({"keep_docs_without_images": True}, "ABCDE", {}),
        ({"drop_docs_with_missing_images": True}, "A", {"missing_images": 2, "no_images": 2}),
        (
            {"keep_docs_without_images": True, "drop_docs_with_missing_images": True},
            "AE",
            {"missing_images": 3},
        ),
    ],
)
def test_keep_and_drop_options_decide_each_document_as_documented(
    tmp_path: Path, options: dict, written: str, reasons: dict
) -> None:
    """A: every image found, B: one missing, C: one undecodable, D: none found, E: no image listed.
    A rejected image counts as missing for --drop-docs-with-missing-images."""

    def lines(good: dict) -> list[bytes]:
        info, row = good["image_info"][0], good["similarity_matrix"][0]

        def doc(*names: str) -> bytes:
            infos = [{**info, "image_name": n} for n in names]
            return json.dumps(
                {**good, "image_info": infos, "similarity_matrix": [row] * len(names)}
            ).encode()

        found = info["image_name"]
        return [doc(found, "gone.jpg"), doc(found, "corrupt.jpg"), doc("gone.jpg"), doc()]

    sample = _sample_with_lines(tmp_path, lines)
    (Path(sample["images"]) / "0" / "corrupt.jpg").write_bytes(make_image(1)[:300])
    stats = convert(sample, tmp_path / "out", **options)
    keys = {f"shard_0-{line:07d}": name for line, name in enumerate("ABCDE", start=1)}
    assert sorted(keys[k] for k in read_records(tmp_path / "out")) == list(written)
    assert stats["counts"]["documents"]["in"] == 5
    assert stats["counts"]["documents"].get("rejected", 0) == 5 - len(written)
    assert stats["reasons"].get("documents", {}) == reasons
    image_lines = [
        (r["key"], r["reason"], r["document"])
        for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())
        if r["kind"] == "images"
    ]
    fate = {name: "written" if name in written else "rejected" for name in "BCD"}
    assert image_lines == [  # every image not embedded, with its document's fate
        ("shard_0-0000002/gone.jpg", "missing", fate["B"]),
        ("shard_0-0000003/corrupt.jpg", "undecodable", fate["C"]),
        ("shard_0-0000004/gone.jpg", "missing", fate["D"]),
    ]
    n_a = len(sample["documents"][0][0]["image_info"])  # A: the sample's own document
    assert stats["counts"]["images"] == {
        "in": n_a + 5,
        "found": n_a + 2,
        "kept": n_a + 2,
        "missing": 2,
        "rejected": 1,
    }


def test_bad_command_line_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert (
        cli(
            [
                "convert",
                "mmc4",
                "--docs",
                str(tmp_path / "none_{0..3}.zip"),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no MMC4 zip, .jsonl, .jsonl.gz or .jsonl.zst file matches" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=2)
    assert (
        cli(
            [
                "convert",
                "mmc4",
                "--docs",
                sample["docs"],
                "--images",
                sample["images"],
                "--out",
                str(blocker / "sub"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output folder" in err[0]
    for bad in (["--quality", "0"], ["--resize-filter", "nearest"]):
        with pytest.raises(SystemExit) as exit_:
            cli(
                ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
                + ["--out", str(tmp_path / "q"), *bad]
            )
        assert exit_.value.code == 2


def test_resize_filter_reaches_the_image_stage(sample: dict, tmp_path: Path) -> None:
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--short-side", "16", "--no-progress", "--processes", "1"]
    assert cli([*args, "--out", str(tmp_path / "cubic")]) == 0
    assert cli([*args, "--out", str(tmp_path / "area"), "--resize-filter", "area"]) == 0
    cubic, area = (sorted((tmp_path / n).glob("*.tar")) for n in ("cubic", "area"))
    assert len(cubic) == len(area) > 0
    assert [p.read_bytes() for p in cubic] != [p.read_bytes() for p in area]


def test_values_json_output_cannot_carry_are_counted_rejects(tmp_path: Path) -> None:
    """A lone surrogate, NaN and a 70-bit integer parse in Python but are not writable JSON."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=1, docs_per_shard=4, missing_rate=0.0, seed=9
    )
    docs_dir = Path(sample["docs"]).parent
    raw = zipfile.ZipFile(docs_dir / "shard_0.zip").read("shard_0.jsonl").splitlines()
    good = json.loads(raw[0])
    surrogate = json.dumps({**good, "url": "x"}).replace('"url": "x"', '"url": "bad \\ud800"')
    rows, cols = len(good["image_info"]), len(good["text_list"])
    nan_matrix = json.dumps({**good, "similarity_matrix": [[float("nan")] * cols] * rows})
    huge = json.dumps({**good, "similarity_matrix": [[2**70] * cols] * rows})
    lines = [surrogate.encode(), nan_matrix.encode(), huge.encode(), raw[0]]
    _zip(docs_dir / "shard_0.zip", {"shard_0.jsonl": b"\n".join(lines) + b"\n"})
    stats = convert(sample, tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["documents"] == {
        "invalid_unicode": 1,
        "bad_matrix_shape": 1,
        "unencodable_value": 1,
    }
    report = validate_shards([str(tmp_path / "out")])
    assert report.ok and list(read_records(tmp_path / "out")) == ["shard_0-0000004"]


def test_no_fsync_writes_the_same_bytes_without_syncing(sample: dict, tmp_path: Path, monkeypatch):
    import flamingo_data.storage.atomic as atomic

    convert(sample, tmp_path / "durable")
    calls = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(fd))
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    assert cli([*args, "--out", str(tmp_path / "fast"), "--no-fsync", "--processes", "1"]) == 0
    assert tar_bytes(tmp_path / "fast") == tar_bytes(tmp_path / "durable")
    assert len(calls) == 4  # only the driver's sizes.json and stats.json (file + folder each)


def _sample_with_lines(tmp_path: Path, lines: Callable[[dict], list[bytes]]) -> dict:
    """A one-zip sample: a good document whose images exist, then ``lines(that document)``."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=1, docs_per_shard=1, missing_rate=0.0, seed=9
    )
    docs_dir = Path(sample["docs"]).parent
    raw = zipfile.ZipFile(docs_dir / "shard_0.zip").read("shard_0.jsonl").splitlines()[0]
    data = b"\n".join([raw, *lines(json.loads(raw))]) + b"\n"
    _zip(docs_dir / "shard_0.zip", {"shard_0.jsonl": data})
    return sample


def test_lines_python_cannot_parse_are_counted_not_crashes(tmp_path: Path) -> None:
    """A 5000-digit integer and deep nesting are bad_json; a non-list image_info is counted too."""
    huge = b'{"text_list": ["a"], "x": ' + b"1" * 5000 + b"}"
    deep = b'{"text_list": ["a"], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    not_a_list = b'{"text_list": ["a"], "image_info": 5, "similarity_matrix": []}'
    sample = _sample_with_lines(tmp_path, lambda good: [huge, deep, not_a_list])
    stats = convert(sample, tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["documents"] == {"bad_json": 2, "bad_image_info": 1}


def test_image_names_that_name_no_file_are_counted_not_crashes(tmp_path: Path) -> None:
    """NUL and a lone surrogate are unsafe names; a name too long for the filesystem is missing."""

    def lines(good: dict) -> list[bytes]:
        info, row = good["image_info"][0], good["similarity_matrix"][:1]
        return [
            json.dumps(
                {**good, "image_info": [{**info, "image_name": name}], "similarity_matrix": row}
            ).encode()
            for name in ("a\0b.jpg", "\ud800.jpg", "x" * 300 + ".jpg")
        ]

    stats = convert(_sample_with_lines(tmp_path, lines), tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["images"] == {"unsafe_image_name": 2}
    assert stats["counts"]["images"]["missing"] == 1


def test_image_bytes_already_in_the_source_are_refused(tmp_path: Path) -> None:
    """Only --images supplies bytes: source base64 would skip the pixel cap and every image check."""

    def lines(good: dict) -> list[bytes]:
        info = {**good["image_info"][0], "image_name": "not_downloaded.png"}
        row = good["similarity_matrix"][:1]
        return [
            json.dumps(
                {**good, "image_info": [{**info, "image_base64": value}], "similarity_matrix": row}
            ).encode()
            for value in ("!!not base64", 5, base64.b64encode(png_bomb()).decode())
        ]

    sample = _sample_with_lines(tmp_path, lines)
    stats = convert(sample, tmp_path / "out", keep_docs_without_images=True)
    assert stats["counts"]["documents"] == {"in": 4, "written": 1, "rejected": 3}
    assert stats["reasons"]["documents"] == {"bad_image_info": 3}
    assert validate_shards([str(tmp_path / "out")], deep=True).ok


def _zip_with_header_change(path: Path, data: bytes, flag: int = 0, method: int | None = None):
    """A stored zip whose local and central headers get ``flag`` bits / another ``method``."""
    _zip(path, {"shard.jsonl": data})
    raw = bytearray(path.read_bytes())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = raw.find(signature)
        raw[start + flag_at] |= flag
        if method is not None:
            raw[start + method_at : start + method_at + 2] = method.to_bytes(2, "little")
    path.write_bytes(bytes(raw))


def test_encrypted_or_unsupported_zips_are_counted_unit_rejects(tmp_path: Path) -> None:
    """Python's zipfile raises RuntimeError for these: one such zip must not stop the run."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=3, docs_per_shard=2, missing_rate=0.0, seed=9
    )
    docs_dir = Path(sample["docs"]).parent
    lines = zipfile.ZipFile(docs_dir / "shard_0.zip").read("shard_0.jsonl")
    _zip_with_header_change(docs_dir / "shard_0.zip", lines, flag=1)  # encrypted
    _zip_with_header_change(docs_dir / "shard_2.zip", lines, method=9)  # deflate64
    stats = convert(sample, tmp_path / "out")
    assert stats["reasons"]["units"] == {"unreadable_zip": 2}
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}


def test_a_cut_off_zip_is_truncated_and_a_non_zip_unreadable(tmp_path: Path) -> None:
    """A download cut in half has lost the central directory; zipfile calls it "not a zip file",
    which would send the user looking for a wrong format instead of redoing the download."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=3, docs_per_shard=2, missing_rate=0.0, seed=4
    )
    docs_dir = Path(sample["docs"]).parent
    whole = (docs_dir / "shard_0.zip").read_bytes()
    (docs_dir / "shard_0.zip").write_bytes(whole[: len(whole) // 2])
    (docs_dir / "shard_2.zip").write_bytes(b"<html>404 not found</html>")
    stats = convert(sample, tmp_path / "out")
    assert stats["reasons"]["units"] == {"truncated_zip": 1, "unreadable_zip": 1}
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}  # shard_1 whole
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").open()]
    by_unit = {r["unit"]: r for r in rejects if r["kind"] == "units"}
    assert by_unit["shard_0"]["reason"] == "truncated_zip"
    assert "central directory) is missing: a cut-off download" in by_unit["shard_0"]["detail"]
    assert by_unit["shard_2"]["reason"] == "unreadable_zip"
    assert "not a zip file" in by_unit["shard_2"]["detail"]


def test_resume_redoes_a_zip_that_could_not_be_read(tmp_path: Path) -> None:
    """A finished unit is skipped on resume, but one whose zip was cut off is not finished: after
    the download is redone, --resume converts it, and the output equals a run on good input."""
    sample = write_mmc4_sample(
        tmp_path / "src", n_shards=2, docs_per_shard=3, missing_rate=0.0, seed=5
    )
    zip_path = Path(sample["docs"]).parent / "shard_1.zip"
    whole = zip_path.read_bytes()

    def run(out: Path, resume: bool) -> dict:
        return convert_mmc4(
            sample["docs"],
            Mmc4Options(images=sample["images"]),
            RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True, resume=resume),
            execution=Execution(processes=1, progress=False),
        ).to_json()

    zip_path.write_bytes(whole[: len(whole) // 2])
    run(tmp_path / "out", resume=False)
    still_cut = run(tmp_path / "out", resume=True)  # not repaired yet: counted again, not lost
    assert still_cut["reasons"]["units"] == {"truncated_zip": 1}
    assert still_cut["counts"]["documents"] == {"in": 3, "written": 3}

    zip_path.write_bytes(whole)  # the download, redone
    repaired = run(tmp_path / "out", resume=True)
    assert repaired["counts"]["documents"] == {"in": 6, "written": 6}
    assert "units" not in repaired["reasons"]
    assert not (tmp_path / "out" / "rejects.jsonl").read_text()
    run(tmp_path / "clean", resume=False)
    for name in ("shard_0-00000.tar", "shard_1-00000.tar", "sizes.json", "stats.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_keys_name_the_source_line_when_blank_lines_are_skipped(tmp_path: Path) -> None:
    sample = _sample_with_lines(
        tmp_path, lambda good: [b"", b"  ", b"{bad", json.dumps(good).encode()]
    )
    convert(sample, tmp_path / "out")
    rejects = [json.loads(r) for r in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["shard_0-0000004"]
    assert list(read_records(tmp_path / "out")) == ["shard_0-0000001", "shard_0-0000005"]


@pytest.mark.parametrize(
    "bad", [["--max-side", "-5"], ["--short-side", "0"], ["--max-pixels", "0"]]
)
def test_sizes_that_are_not_positive_are_usage_errors(tmp_path: Path, bad: list[str]) -> None:
    """A negative size used to shrink every image to 1 x 1, and 0 was silently ignored."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=1)
    with pytest.raises(SystemExit) as exit_:
        cli(
            ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
            + ["--out", str(tmp_path / "o"), *bad]
        )
    assert exit_.value.code == 2


def test_a_motion_photo_keeps_its_image_and_loses_its_video(tmp_path: Path) -> None:
    """Bytes after a whole JPEG are counted as ``trimmed``; the shard holds the image alone."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=1, missing_rate=0.0)
    doc = sample["documents"][0][0]
    path = Path(sample["images"]) / "0" / doc["image_info"][0]["image_name"]
    jpeg = make_image(1, 64, 48, "JPEG")
    path.write_bytes(jpeg + b"\x00\x00\x00\x18ftypmp42" + b"video" * 2000)
    stats = convert(sample, tmp_path / "out")
    assert stats["counts"]["images"]["trimmed"] == 1
    record = read_records(tmp_path / "out")["shard_0-0000001"]
    assert base64.b64decode(record["image_info"][0]["image_base64"]) == jpeg
    assert validate_shards(str(tmp_path / "out"), deep=True).ok


def test_jsonl_members_are_found_whatever_the_case_of_their_suffix(tmp_path: Path) -> None:
    sample = _sample_with_lines(tmp_path, lambda good: [])
    docs_dir = Path(sample["docs"]).parent
    line = zipfile.ZipFile(docs_dir / "shard_0.zip").read("shard_0.jsonl")
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \n\x00\x02\xff\n"
    members = {"a.jsonl": line, "B.JSONL": line, "notes.txt": b"not data"}
    members |= {"__MACOSX/._a.jsonl": apple_double, "__MACOSX/._B.JSONL": apple_double}
    _zip(docs_dir / "shard_0.zip", members)
    stats = convert(sample, tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}


def test_resume_refuses_other_options_and_names_them(sample: dict, tmp_path: Path, capsys) -> None:
    """Finishing a run at another size or quality would mix two kinds of image in one dataset."""
    base = ["convert", "mmc4", "--docs", sample["docs"], "--out", str(tmp_path / "out")]
    base += ["--processes", "1"]
    assert cli([*base, "--images", sample["images"], "--short-side", "32"]) == 0
    before = tar_bytes(tmp_path / "out")
    capsys.readouterr()
    resumed = [*base, "--images", sample["images"], "--resume", "--short-side", "48"]
    assert cli(resumed) == 2
    err = capsys.readouterr().err
    assert (
        "other options (policy.short_side: 32 in the run, 48 now)" in err
        and len(err.strip().splitlines()) == 1
    )
    assert tar_bytes(tmp_path / "out") == before
    moved = tmp_path / "moved"
    Path(sample["images"]).rename(moved)  # same options, images moved: resumes
    assert cli([*base, "--images", str(moved), "--resume", "--short-side", "32"]) == 0
    assert cli([*base, "--images", str(moved), "--overwrite", "--short-side", "48"]) == 0


def test_nan_outside_the_matrix_is_written_as_null_and_counted(tmp_path: Path) -> None:
    """JSON has no NaN: the record holds null there, and the change is counted, not silent."""

    def lines(good: dict) -> list[bytes]:
        text = json.dumps({**good, "face_detections": [float("nan"), float("inf")]})
        return [text.encode()]  # Python's json writes NaN and Infinity, as MMC4's tools would

    stats = convert(_sample_with_lines(tmp_path, lines), tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 2, "written": 2}
    assert stats["counts"]["values"] == {"non_finite_as_null": 2}
    assert read_records(tmp_path / "out")["shard_0-0000002"]["face_detections"] == [None, None]


def test_an_over_long_line_is_counted_and_skipped_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line over the cap (a zip bomb's one line: 400 KB of zip held 400 MB and took 1.6 GB
    to read) is line_too_long; the lines around it, and their keys, are unaffected."""
    monkeypatch.setattr(mmc4, "MAX_LINE_BYTES", 4096)
    sample = _sample_with_lines(
        tmp_path,
        lambda good: [b'{"url": "' + b"x" * 10_000 + b'"}', json.dumps(good).encode()],
    )
    stats = convert(sample, tmp_path / "out")
    assert stats["counts"]["documents"] == {"in": 3, "written": 2, "rejected": 1}
    assert stats["reasons"]["documents"] == {"line_too_long": 1}
    assert list(read_records(tmp_path / "out")) == ["shard_0-0000001", "shard_0-0000003"]


def _peak_mb_converting(sample: dict, out: Path) -> int:
    """Peak memory (MB) of a fresh process converting ``sample`` in-process (a run that writes
    nothing counts too)."""
    code = (
        "import contextlib, resource; from flamingo_data.converters.mmc4 import Mmc4Options, "
        "convert_mmc4; from flamingo_data.errors import NothingWritten; "
        "from flamingo_data.run.units import RunOptions; "
        "from flamingo_data.run.executors import Execution\n"
        "with contextlib.suppress(NothingWritten):\n"
        f"    convert_mmc4({sample['docs']!r}, Mmc4Options(images={sample['images']!r}), "
        f"RunOptions(out_dir={str(out)!r}, converter='mmc4'), "
        "execution=Execution(processes=1, progress=False))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_a_zip_bomb_line_does_not_fill_memory(tmp_path: Path) -> None:
    """300 MB of one line in a 300 KB zip: peak memory grows by a few times the cap (64 MiB),
    not by the line (it grew by ~1 GB before the cap)."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=1, seed=9)
    baseline = _peak_mb_converting(sample, tmp_path / "plain")
    bomb = Path(sample["docs"]).parent / "shard_0.zip"
    good = zipfile.ZipFile(bomb).read("shard_0.jsonl")
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("a.jsonl", "w") as out:
        out.write(good + b'{"url": "')
        for _ in range(300):
            out.write(b"x" * 2**20)
        out.write(b'"}\n')
    assert _peak_mb_converting(sample, tmp_path / "out") - baseline < 400
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    # inflating 1000 times its size, the zip is refused unread (line_too_long: see the test above)
    assert stats["reasons"]["units"] == {"compression_bomb": 1}
    assert "documents" not in stats["counts"]


@pytest.mark.parametrize(
    "first", [[], ["--rejects"]], ids=["without-then-with", "with-then-without"]
)
def test_resume_refuses_a_change_of_rejects(
    first: list[str], sample: dict, tmp_path: Path, capsys
) -> None:
    """Finished units keep the rejects part they were (not) written with: resuming a run started
    without --rejects with it gave a rejects.jsonl holding 3 of the 6 rejects stats.json counted."""
    out = tmp_path / "out"
    base = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    base += ["--out", str(out), "--processes", "1"]
    assert cli([*base, *first]) == 0
    (out / "_done" / "shard_2.json").unlink()  # as if the run was killed before this unit finished
    capsys.readouterr()
    assert cli([*base, "--resume", *(["--rejects"] if not first else [])]) == 2
    assert "other options (rejects: " in capsys.readouterr().err
    assert cli([*base, "--resume", *first]) == 0


CLI_PEAK = (
    "import resource, sys; from flamingo_data.cli.main import main; code = main(sys.argv[1:]); "
    "print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
)


def _cli_exit_and_peak_mb(sample: dict, out: Path, *extra: str) -> tuple[int, int]:
    """(exit code, peak MB) of ``convert mmc4`` in a fresh process; a 60 s limit (a hang fails)."""
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--out", str(out), "--processes", "1", "--no-progress", *extra]
    done = subprocess.run(
        [sys.executable, "-c", CLI_PEAK, *args], capture_output=True, text=True, timeout=60
    )
    code, peak = done.stdout.split()[-2:]
    return int(code), int(peak)


def test_a_huge_image_file_is_refused_unread_and_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """A 1 GiB image file was read whole (+1 GB per worker) before any check, and a FIFO among
    the images blocked the converter forever on open."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=6, missing_rate=0)
    files = sorted(p for p in Path(sample["images"]).rglob("*") if p.is_file())
    baseline = _cli_exit_and_peak_mb(sample, tmp_path / "plain", "--max-image-bytes", "1000000")
    huge, fifo = files[0], files[1]
    with open(huge, "r+b") as handle:  # its real JPEG bytes, then 1 GiB of zeros (sparse)
        handle.truncate(2**30)
    fifo.unlink()
    os.mkfifo(fifo)
    code, peak = _cli_exit_and_peak_mb(sample, tmp_path / "out", "--max-image-bytes", "1000000")
    assert code == 0 and peak - baseline[1] < 200, (baseline, peak)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    plain = json.loads((tmp_path / "plain" / "stats.json").read_text())
    assert stats["reasons"]["images"] == {"too_many_bytes": 1}
    assert stats["counts"]["images"]["missing"] == plain["counts"]["images"].get("missing", 0) + 1
