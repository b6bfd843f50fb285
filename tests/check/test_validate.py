"""validate: good shards pass; each kind of broken shard is reported by key and reason, exit non-zero."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flamingo_data.check.validate import validate_shards
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.core.records import encode_base64
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.loader.stream import sizes_total
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from flamingo_data.storage.shard_reader import iter_samples
from flamingo_data.storage.shard_writer import ShardWriter
from tests.images.test_images import png_bomb


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    sample = write_mmc4_sample(root / "src", n_shards=2, docs_per_shard=5, missing_rate=0.0)
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        RunOptions(out_dir=str(root / "out"), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    return root / "out"


def first_record(good: Path) -> dict:
    with tarfile.open(next(good.glob("*.tar"))) as tar:
        return json.loads(tar.extractfile(tar.next()).read())


def gpt_record(example: str, numbers: list[int], image: bytes | None = None) -> dict:
    image = image or make_image(3)
    return {
        "is_gpt": True,
        "example": example,
        "image_map": {f"_!_IMAGE{n}_!_": {"base64_image": encode_base64(image)} for n in numbers},
    }


def _without_bytes(info: dict) -> dict:
    return {name: value for name, value in info.items() if name != "image_base64"}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_good_shards_pass_and_counts_match_sizes(good: Path) -> None:
    report = validate_shards(str(good), deep=True)
    assert report.ok and report.samples == sum(
        json.loads((good / "sizes.json").read_text()).values()
    )
    assert cli(["validate", str(good)]) == 0


def test_gpt_and_pair_shards_pass(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "mix")
    writer.write(
        "g1", {"json": json.dumps(gpt_record("a _!_IMAGE1_!_ b _!_IMAGE2_!_", [1, 2])).encode()}
    )
    writer.write(
        "p1",
        {
            "jpg": make_image(4),
            "txt": "a caption é".encode(),
            "json": b'{"key": "p1", "status": "success"}',
        },
    )
    writer.close()
    report = validate_shards(str(tmp_path), deep=True)
    assert report.ok and dict(report.kinds) == {"gpt": 1, "pair": 1}


def broken_cases(good: Path) -> dict[str, tuple[dict[str, bytes], str, str]]:
    """name -> (tar members, failing key, reason)."""
    rec = first_record(good)
    wrong_shape = {**rec, "similarity_matrix": rec["similarity_matrix"][:-1] + [[0.1]]}
    bad_index = {
        **rec,
        "image_info": [{**rec["image_info"][0], "matched_text_index": 999}] + rec["image_info"][1:],
    }
    bad_b64 = {
        **rec,
        "image_info": [{**rec["image_info"][0], "image_base64": "@@@@"}] + rec["image_info"][1:],
    }
    not_image = {
        **rec,
        "image_info": [{**rec["image_info"][0], "image_base64": encode_base64(b"<html>hi</html>")}]
        + rec["image_info"][1:],
    }
    bomb = {
        **rec,
        "image_info": [{**rec["image_info"][0], "image_base64": encode_base64(png_bomb())}]
        + rec["image_info"][1:],
    }
    no_images = {**rec, "image_info": [_without_bytes(info) for info in rec["image_info"]]}
    # libjpeg-turbo decodes a cut-off JPEG with a warning (grey rows); the loader and --deep refuse it
    jpeg = make_image(6)
    cut_jpeg = gpt_record("_!_IMAGE1_!_ x", [1], jpeg[: len(jpeg) * 2 // 3])
    gpt_bad_b64 = gpt_record("_!_IMAGE1_!_ x", [1])
    gpt_bad_b64["image_map"]["_!_IMAGE1_!_"]["base64_image"] = "not base64!"
    nan_row = [float("nan")] * len(rec["text_list"])
    nan_matrix = {**rec, "similarity_matrix": [nan_row for _ in rec["image_info"]]}
    lone_surrogate = {**rec, "text_list": ["\ud800" + text for text in rec["text_list"]]}
    dumps = lambda obj: json.dumps(obj).encode()  # noqa: E731
    return {
        "bad_json": ({"k.json": b"{oops"}, "k", "bad_json"),
        "json_nan": ({"k.json": dumps(nan_matrix)}, "k", "bad_json"),
        "json_lone_surrogate": ({"k.json": dumps(lone_surrogate)}, "k", "bad_json"),
        "json_too_deep": ({"k.json": b"[" * 100_000 + b"]" * 100_000}, "k", "bad_json"),
        "json_huge_int": ({"k.json": b'{"n": ' + b"9" * 5000 + b"}"}, "k", "bad_json"),
        "schema": ({"k.json": dumps({**rec, "text_list": "not a list"})}, "k", "schema"),
        "is_gpt_not_true": ({"k.json": dumps({**rec, "is_gpt": 1})}, "k", "schema"),
        "matrix": ({"k.json": dumps(wrong_shape)}, "k", "bad_matrix_shape"),
        "index": ({"k.json": dumps(bad_index)}, "k", "index_out_of_range"),
        "base64": ({"k.json": dumps(bad_b64)}, "k", "bad_base64"),
        "not_image": ({"k.json": dumps(not_image)}, "k", "not_an_image"),
        "gpt_mismatch": (
            {"k.json": dumps(gpt_record("_!_IMAGE1_!_ x _!_IMAGE3_!_", [1, 2]))},
            "k",
            "placeholder_mismatch",
        ),
        "gpt_leading_zero": (
            {"k.json": dumps(gpt_record("_!_IMAGE01_!_ x", [1]))},
            "k",
            "placeholder_mismatch",
        ),
        "gpt_gap": (
            {"k.json": dumps(gpt_record("_!_IMAGE1_!_ x _!_IMAGE3_!_", [1, 3]))},
            "k",
            "placeholder_numbering",
        ),
        "no_images": ({"k.json": dumps(no_images)}, "k", "no_images"),
        "gpt_bad_base64": ({"k.json": dumps(gpt_bad_b64)}, "k", "bad_base64"),
        "roles_short": (
            {"k.json": dumps({**rec, "text_roles": ["user"] * (len(rec["text_list"]) + 1)})},
            "k",
            "bad_roles",
        ),
        "spans_outside": (
            {
                "k.json": dumps(
                    {**gpt_record("_!_IMAGE1_!_ x", [1]), "role_spans": [["user", 0, 99]]}
                )
            },
            "k",
            "bad_roles",
        ),
        "spans_not_numbers": (
            {
                "k.json": dumps(
                    {**gpt_record("_!_IMAGE1_!_ x", [1]), "role_spans": [["user", "0", 2]]}
                )
            },
            "k",
            "schema",
        ),
        "gpt_repeated": (
            {"k.json": dumps(gpt_record("_!_IMAGE1_!_ x _!_IMAGE1_!_", [1]))},
            "k",
            "placeholder_repeated",
        ),
        "caption_not_utf8": (
            {"k.jpg": make_image(5), "k.txt": b"caf\xe9", "k.json": b'{"key": "k"}'},
            "k",
            "caption_not_utf8",
        ),
        "pair_no_image": ({"k.txt": b"caption", "k.json": b'{"key": "k"}'}, "k", "missing_image"),
        "pickle": (
            {"k.json": dumps(rec), "k.pickle": pickle.dumps({"a": 1})},
            "k",
            "unexpected_member",
        ),
        "dotdot": ({"../k.json": dumps(rec)}, "../k.json", "unsafe_member_name"),
        "absolute": ({"/etc/k.json": dumps(rec)}, "/etc/k.json", "unsafe_member_name"),
        "not_utf8_name": ({"k\udcff.json": dumps(rec)}, "k\udcff.json", "unsafe_member_name"),
        "deep_bomb": ({"k.json": dumps(bomb)}, "k", "too_many_pixels"),
        "deep_cut_jpeg": ({"k.json": dumps(cut_jpeg)}, "k", "undecodable_image"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bad_json",
        "json_nan",
        "json_lone_surrogate",
        "json_too_deep",
        "json_huge_int",
        "schema",
        "is_gpt_not_true",
        "matrix",
        "index",
        "base64",
        "not_image",
        "gpt_mismatch",
        "gpt_leading_zero",
        "gpt_gap",
        "pair_no_image",
        "no_images",
        "gpt_bad_base64",
        "gpt_repeated",
        "roles_short",
        "spans_outside",
        "spans_not_numbers",
        "caption_not_utf8",
        "pickle",
        "dotdot",
        "absolute",
        "not_utf8_name",
        "deep_bomb",
        "deep_cut_jpeg",
    ],
)
def test_each_broken_shard_is_reported_by_key_and_reason(
    good: Path, tmp_path: Path, case: str
) -> None:
    members, key, reason = broken_cases(good)[case]
    shard = write_tar(tmp_path / "broken.tar", members)
    report = validate_shards(str(shard), deep=True)
    assert not report.ok
    assert (key, reason) in {(f.key, f.reason) for f in report.failures}
    assert cli(["validate", str(shard), "--deep"]) == 1


@pytest.mark.parametrize(
    ("example", "numbers", "reason"),
    [
        ("_!_IMAGE" + "1" * 5000 + "_!_", ["1" * 5000], "placeholder_numbering"),
        ("_!_IMAGE1_!_ _!_IMAGE" + "1" * 5000 + "_!_", ["1"], "placeholder_mismatch"),
    ],
)
def test_a_placeholder_number_past_python_int_limit_is_a_failure_not_a_crash(
    tmp_path: Path, example: str, numbers: list[str], reason: str
) -> None:
    """A 5000-digit placeholder number (the schema's pattern allows any length) stopped validate
    with a traceback: int() refuses over 4300 digits. Placeholders are compared as text."""
    shard = write_tar(
        tmp_path / "g.tar", {"k.json": json.dumps(gpt_record(example, numbers)).encode()}
    )
    report = validate_shards(str(shard))
    assert [(f.key, f.reason) for f in report.failures] == [("k", reason)]


def test_bomb_is_caught_only_by_deep(good: Path, tmp_path: Path) -> None:
    members, _, _ = broken_cases(good)["deep_bomb"]
    shard = write_tar(tmp_path / "bomb.tar", members)
    assert validate_shards(str(shard)).ok
    assert cli(["validate", str(shard)]) == 0
    assert cli(["validate", str(shard), "--deep"]) == 1


def test_max_pixels_option_reaches_deep_decode(good: Path) -> None:
    assert cli(["validate", str(good), "--deep", "--max-pixels", "100"]) == 1
    reasons = validate_shards(str(good), deep=True, max_pixels=100).reasons()
    assert set(reasons) == {"too_many_pixels"}


def test_links_and_devices_are_reported(good: Path, tmp_path: Path) -> None:
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as tar:
        for name, kind in (("a.json", tarfile.SYMTYPE), ("b.json", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
    failures = {(f.key, f.reason) for f in validate_shards(str(shard)).failures}
    assert failures == {("a.json", "not_a_regular_file"), ("b.json", "not_a_regular_file")}


def gnu_sparse_tar(path: Path, name: str, real_size: int) -> Path:
    """A tar whose one GNU sparse member (type S) stores 512 bytes and declares ``real_size``:
    reading it back fills the hole with zeros."""
    info = tarfile.TarInfo(name)
    info.size, info.type = tarfile.BLOCKSIZE, tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(
        512, 12, tarfile.GNU_FORMAT
    )
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    path.write_bytes(bytes(header) + b"{}".ljust(512, b" ") + tarfile.NUL * 2 * tarfile.BLOCKSIZE)
    return path


def test_a_sparse_member_is_refused_unread(tmp_path: Path) -> None:
    """A 1.5 KiB tar whose member declares 64 MiB: read, it was 64 MiB of zeros in memory (any
    size can be declared, in every loader worker); it is a failure and never expanded."""
    shard = gnu_sparse_tar(tmp_path / "sparse.tar", "k.json", 64 << 20)
    with tarfile.open(shard) as tar:
        assert [m.size for m in tar] == [64 << 20]  # what tarfile would read back
    read = []
    issues = []
    for sample in iter_samples(str(shard), issues.append):
        read += [len(data) for data in sample.members.values()]
    assert read == [] and [(i.key, i.reason) for i in issues] == [("k.json", "sparse_member")]
    failures = {(f.key, f.reason) for f in validate_shards(str(shard)).failures}
    assert failures == {("k.json", "sparse_member")}


def test_an_img2dataset_index_leaves_a_sparse_member_out(tmp_path: Path) -> None:
    """``--images-from`` reads members at their header's offset and size: a sparse member's bytes
    are not stored that way, so it was indexed as a 64 MiB image of whatever follows it."""
    from flamingo_data.fetch.i2d_output import member_offsets

    assert member_offsets(gnu_sparse_tar(tmp_path / "00000.tar", "k.jpg", 64 << 20)) == {}


def member_ends(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for m in tar]


def test_tar_cut_at_member_boundary_is_truncated(good: Path, tmp_path: Path) -> None:
    """tarfile reads such a tar as complete; validate must not, and must not count it in sizes."""
    shard = next(good.glob("*.tar"))
    data, ends = shard.read_bytes(), member_ends(shard)
    (tmp_path / "boundary.tar").write_bytes(data[: ends[1]])
    (tmp_path / "midheader.tar").write_bytes(data[: ends[1] + 100])
    (tmp_path / "whole.tar").write_bytes(data)
    for name in ("boundary.tar", "midheader.tar"):
        report = validate_shards(str(tmp_path / name), write_sizes=True)
        assert [(f.shard, f.key, f.reason) for f in report.failures] == [
            (name, "", "truncated_tar")
        ]
    assert validate_shards(str(tmp_path / "whole.tar"), write_sizes=True).ok
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"whole.tar": len(ends)}


def test_stats_json_is_checked(good: Path, tmp_path: Path) -> None:
    for name in ("sizes.json", *(p.name for p in good.glob("*.tar"))):
        (tmp_path / name).write_bytes((good / name).read_bytes())
    (tmp_path / "stats.json").write_text(json.dumps({"converter": "mmc4", "counts": {"d": -1}}))
    reasons = validate_shards(str(tmp_path)).reasons()
    assert reasons == {"stats_schema": 1}


@pytest.mark.parametrize("text", ["{oops", "[1, 2]", "[" * 100_000])
def test_malformed_sizes_and_stats_json(good: Path, tmp_path: Path, text: str) -> None:
    """Reported by name when checked, replaced by --write-sizes; never a crash or exit 2."""
    shard = next(good.glob("*.tar"))
    (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "sizes.json").write_text(text)
    (tmp_path / "stats.json").write_text(text)
    reasons = set(validate_shards(str(tmp_path)).reasons())
    assert reasons == {"bad_sizes_json" if text != "[1, 2]" else "sizes_schema", "stats_schema"}
    assert cli(["validate", str(tmp_path)]) == 1
    validate_shards(str(tmp_path), write_sizes=True)
    sizes = json.loads((good / "sizes.json").read_text())
    assert json.loads((tmp_path / "sizes.json").read_text()) == {shard.name: sizes[shard.name]}


def test_shard_level_breakage(good: Path, tmp_path: Path) -> None:
    data = next(good.glob("*.tar")).read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.tar").write_bytes(b"")
    write_tar(tmp_path / "nothing.tar", {})
    (tmp_path / "text.tar").write_bytes(b"this is not a tar file at all" * 40)
    reasons = {(f.shard, f.reason) for f in validate_shards(str(tmp_path)).failures}
    assert {
        ("truncated.tar", "truncated_tar"),
        ("zero.tar", "empty_tar"),
        ("nothing.tar", "empty_tar"),
        ("text.tar", "not_a_tar"),
    } <= reasons


def test_a_sizes_count_written_as_a_float_fails_as_the_loader_ignores_it(
    good: Path, tmp_path: Path
) -> None:
    """JSON Schema's integer includes 6.0, so validate passed it; the loader reads no epoch length
    from such a sizes.json (and a resampled run refuses to start)."""
    shard = next(good.glob("*.tar"))
    (tmp_path / shard.name).write_bytes(shard.read_bytes())
    count = json.loads((good / "sizes.json").read_text())[shard.name]
    (tmp_path / "sizes.json").write_text(json.dumps({shard.name: float(count)}))
    assert sizes_total([str(tmp_path / shard.name)]) is None
    assert validate_shards(str(tmp_path)).reasons() == {"sizes_schema": 1}
    (tmp_path / "sizes.json").write_text(json.dumps({shard.name: count}))
    assert sizes_total([str(tmp_path / shard.name)]) == count
    assert validate_shards(str(tmp_path)).ok


def test_duplicate_keys_across_shards_and_sizes_mismatch(good: Path, tmp_path: Path) -> None:
    shard = next(good.glob("*.tar"))
    (tmp_path / "a.tar").write_bytes(shard.read_bytes())
    (tmp_path / "b.tar").write_bytes(shard.read_bytes())
    (tmp_path / "sizes.json").write_text(json.dumps({"a.tar": 999}))
    report = validate_shards(str(tmp_path))
    reasons = report.reasons()
    assert reasons["duplicate_key"] == json.loads((good / "sizes.json").read_text())[shard.name]
    assert {(f.shard, f.reason) for f in report.failures} >= {
        ("a.tar", "count_mismatch"),
        ("b.tar", "missing_from_sizes_json"),
    }


def test_sizes_of_same_named_shards_in_two_folders(good: Path, tmp_path: Path) -> None:
    """Counts are kept by path: b/00000.tar's count must not land in a/sizes.json."""
    shard = next(good.glob("*.tar"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "00000.tar").write_bytes(shard.read_bytes())
    (tmp_path / "b").mkdir()
    write_tar(tmp_path / "b" / "00000.tar", {"other.json": json.dumps(first_record(good)).encode()})
    assert validate_shards(f"{tmp_path}/{{a,b}}/00000.tar", write_sizes=True).ok
    expected = json.loads((good / "sizes.json").read_text())[shard.name]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {"00000.tar": expected}
    assert json.loads((tmp_path / "b" / "sizes.json").read_text()) == {"00000.tar": 1}
    assert validate_shards(f"{tmp_path}/{{a,b}}/00000.tar").ok


def test_write_sizes_and_json_report(good: Path, tmp_path: Path) -> None:
    for shard in good.glob("*.tar"):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    assert cli(["validate", str(tmp_path), "--write-sizes"]) == 0
    assert json.loads((tmp_path / "sizes.json").read_text()) == json.loads(
        (good / "sizes.json").read_text()
    )
    report_path = tmp_path / "report.json"
    assert cli(["validate", f"{tmp_path}/*.tar", "--json", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["ok"] is True


def test_real_subprocess_and_bad_spec(good: Path, tmp_path: Path) -> None:
    bad = write_tar(tmp_path / "bad.tar", {"x.json": b"{"})
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "validate", str(bad), "--json", "-"],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 1 and json.loads(result.stdout)["failures"][0]["reason"] == "bad_json"
    )
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "validate", str(tmp_path / "none_{1..3}.tar")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no shard matches" in result.stderr


def test_deep_passes_a_jpeg_with_junk_before_a_marker_as_the_loader_reads_it(
    tmp_path: Path,
) -> None:
    """Common on the web; PIL (and so upstream) reads it, and so do --deep and the loader."""
    jpeg = make_image(6)
    dqt = jpeg.index(b"\xff\xdb")
    record = gpt_record("_!_IMAGE1_!_ x", [1], jpeg[:dqt] + b"\x00\x01\x02" + jpeg[dqt:])
    shard = write_tar(tmp_path / "junk.tar", {"k.json": json.dumps(record).encode()})
    report = validate_shards(str(shard), deep=True)
    assert report.ok, report.failures


def test_a_named_shard_that_does_not_exist_fails_the_dataset(good: Path, capsys) -> None:
    """A hole in a brace list or a mistyped path is a dataset the user did not mean; only a spec
    that names nothing at all is a usage error."""
    shards = sorted(p.name for p in good.glob("*.tar"))
    spec = f"{good}/{{{','.join([*shards, 'shard_9-00000.tar'])}}}"
    report = validate_shards(spec)
    assert [(f.shard, f.reason) for f in report.failures] == [
        ("shard_9-00000.tar", "missing_shard")
    ]
    assert report.shards == len(shards)
    assert cli(["validate", str(good), str(good / "nope.tar")]) == 1
    assert cli(["validate", str(good / "nope.tar")]) == 2


@pytest.mark.parametrize("where", ["folder", "no_parent"])
def test_an_unwritable_json_report_is_a_usage_error_before_any_work(
    good: Path, tmp_path: Path, capsys, where: str
) -> None:
    target = tmp_path if where == "folder" else tmp_path / "no" / "report.json"
    assert cli(["validate", str(good), "--json", str(target)]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out and "cannot write the --json report" in err
    assert len(err.strip().splitlines()) == 1


def test_summary_of_odd_member_names_prints_escaped_on_a_utf8_terminal(
    good: Path, tmp_path: Path
) -> None:
    """A member name that is not UTF-8 stopped the summary with UnicodeEncodeError on a UTF-8
    stdout (traceback, report lost); a terminal escape sequence in a name reached the terminal."""
    shard = write_tar(
        tmp_path / "odd.tar",
        {"k\udcff.json": b"{}", "\x1b[2Jk.json": b"{oops"},
    )
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "validate", str(shard)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="surrogateescape",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "odd.tar k\\udcff.json: unsafe_member_name" in result.stdout
    assert "\x1b" not in result.stdout and "\\x1b[2Jk" in result.stdout


@pytest.mark.parametrize("case", ["folder", "no_parent", "missing_to_compare"])
def test_a_bad_sizes_path_is_a_usage_error_before_any_work(
    good: Path, tmp_path: Path, capsys, case: str
) -> None:
    """--write-sizes into a folder or a missing folder failed only after every shard was read,
    printing no report at all (exit 1, 'rerun with --resume'); a --sizes that does not exist was
    silently not compared (exit 0)."""
    target = {"folder": tmp_path, "no_parent": tmp_path / "no" / "sizes.json"}.get(
        case, tmp_path / "sizes.json"
    )
    write = ["--write-sizes"] if case != "missing_to_compare" else []
    assert cli(["validate", str(good), "--sizes", str(target), *write]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert str(target) in err and "resume" not in err


def test_one_sizes_file_for_same_named_shards_in_two_folders_is_a_usage_error(
    good: Path, tmp_path: Path, capsys
) -> None:
    """`validate a/ b/ --write-sizes --sizes all.json` kept one count for a/00000.tar and
    b/00000.tar (the last won): a wrong epoch length for one dataset without a word."""
    other = tmp_path / "other"
    shutil.copytree(good, other)
    target = tmp_path / "all.json"
    assert cli(["validate", str(good), str(other), "--sizes", str(target), "--write-sizes"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "each folder" in err
    assert not target.exists()
    same_twice = [str(good), f"{good}/./*.tar", "--sizes", str(target), "--write-sizes"]
    assert cli(["validate", *same_twice]) == 1  # one folder named twice: duplicate keys, no clash
    assert json.loads(target.read_text()) == json.loads((good / "sizes.json").read_text())


def sparse_member_tar(path: Path, first: dict[str, bytes], name: str, size: int) -> Path:
    """A tar with ``first``'s members, then a ``size``-byte member of zeros (sparse on disk)."""
    write_tar(path, first)
    with open(path, "r+b") as handle:
        handle.seek(-2 * tarfile.BLOCKSIZE, io.SEEK_END)
        while handle.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE:
            handle.seek(-2 * tarfile.BLOCKSIZE, io.SEEK_CUR)  # back to the last member's end
        info = tarfile.TarInfo(name)
        info.size = size
        handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
        end = handle.tell() + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        handle.truncate(end + 2 * tarfile.BLOCKSIZE)
    return path


PEAK_RSS = (
    "import resource, sys; from flamingo_data.check.validate import validate_shards;"
    "r = validate_shards(sys.argv[1]);"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sorted(r.reasons().items()))"
)


def _validate_peak_kib(shard: Path) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(shard)], capture_output=True, text=True, check=True
    ).stdout
    peak, reasons = out.split(" ", 1)
    return int(peak), reasons.strip()


def test_a_huge_unexpected_member_is_reported_without_being_read(
    good: Path, tmp_path: Path
) -> None:
    """A 256 MiB member validate never decodes (a video beside a record) was read whole, twice
    over: +512 MB of peak memory to report 'unexpected_member' (+2.4 GB for 1 GiB)."""
    record = {"k.json": json.dumps(first_record(good)).encode()}
    small = sparse_member_tar(tmp_path / "small.tar", record, "k.mp4", 1024)
    big = sparse_member_tar(tmp_path / "big.tar", record, "k.mp4", 256 << 20)
    (small_peak, small_reasons), (big_peak, big_reasons) = map(_validate_peak_kib, (small, big))
    assert small_reasons == big_reasons == "[('unexpected_member', 1)]"
    assert big_peak - small_peak < 64 << 10, (small_peak, big_peak)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(big.read_bytes()[: 128 << 20])
    assert ("cut.tar", "truncated_tar") in {
        (f.shard, f.reason) for f in validate_shards(str(cut)).failures
    }


def test_a_shard_repacked_with_gnu_tar_passes(good: Path, tmp_path: Path) -> None:
    """`tar -cf x.tar -C dir .` adds an entry for the folder ('./'); a good shard repacked so
    failed as not_a_regular_file, though no sample is lost (webdataset skips such entries)."""
    shard = next(good.glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = {f"./{m.name}": tar.extractfile(m).read() for m in tar}
    repacked = tmp_path / "repacked.tar"
    with tarfile.open(repacked, "w") as tar:
        folder = tarfile.TarInfo(".")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = validate_shards(str(repacked))
    assert report.ok, report.failures
    assert report.samples == len(members)


def test_a_glob_or_folder_that_matches_nothing_beside_good_specs_fails(
    good: Path, tmp_path: Path
) -> None:
    """`validate shards/ 'shrads/*.tar' empty/` passed as if only shards/ had been named."""
    (tmp_path / "empty").mkdir()
    specs = [str(good), f"{tmp_path}/shrads/*.tar", f"{tmp_path}/empty"]
    report = validate_shards(specs)
    assert [(f.reason, f.detail) for f in report.failures] == [
        ("missing_shard", specs[1]),
        ("missing_shard", specs[2]),
    ]
    assert cli(["validate", *specs]) == 1
    assert cli(["validate", *specs[1:]]) == 2


def test_tars_joined_with_cat_fail_as_trailing_data(good: Path, tmp_path: Path) -> None:
    """Readers stop at the first end-of-archive block, so the second tar's samples were lost
    without a word: validate passed and wrote the first tar's count into sizes.json."""
    first, second = sorted(good.glob("*.tar"))
    joined = tmp_path / "joined.tar"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    report = validate_shards(str(joined), write_sizes=True)
    assert [(f.shard, f.key, f.reason) for f in report.failures] == [
        ("joined.tar", "", "trailing_data")
    ]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {}
    (tmp_path / "padded").mkdir()
    padded = tmp_path / "padded" / "padded.tar"
    padded.write_bytes(first.read_bytes() + bytes(100_000))
    assert validate_shards(str(padded)).ok


def test_processes_check_shards_in_parallel_with_the_same_report(
    good: Path, tmp_path: Path, monkeypatch
) -> None:
    """Good shards, broken ones, a shard repeated (duplicate keys across workers) and a stale
    sizes.json: the report with 3 processes equals the one-process report, order included."""
    import flamingo_data.check.validate as validate

    dataset = tmp_path / "mixed"
    dataset.mkdir()
    shards = sorted(good.glob("*.tar"))
    for n, shard in enumerate(shards):
        shutil.copy(shard, dataset / f"{n:05d}.tar")
    shutil.copy(shards[0], dataset / "00002.tar")
    cases = broken_cases(good)
    for n, case in enumerate(("matrix", "gpt_repeated", "pickle", "deep_cut_jpeg"), start=3):
        write_tar(dataset / f"{n:05d}.tar", cases[case][0])
    (dataset / "sizes.json").write_text(json.dumps({"00000.tar": 1}))
    pools = []

    def recorded(*args, **kwargs):
        pools.append(args[2])
        return map_in_processes(*args, **kwargs)

    map_in_processes = validate.map_in_processes
    monkeypatch.setattr(validate, "map_in_processes", recorded)
    one = validate_shards(str(dataset), deep=True).to_json()
    assert pools == []
    three = validate_shards(str(dataset), deep=True, processes=3).to_json()
    assert pools == [3]
    assert three == one and not one["ok"]
    assert {"duplicate_key", "count_mismatch", "bad_matrix_shape", "undecodable_image"} <= set(
        one["failures_by_reason"]
    )
    assert cli(["validate", str(dataset), "--deep", "--processes", "2"]) == 1
    with pytest.raises(ValueError, match="`processes` must be at least 1"):
        validate_shards(str(dataset), processes=0)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_progress_reaches_every_shard_on_stderr_and_json_stdout_stays_pure(
    processes: str, good: Path, tmp_path: Path
) -> None:
    for shard in good.glob("*.tar"):
        shutil.copy(shard, tmp_path / shard.name)
    write_tar(tmp_path / "z-bad.tar", {"x.json": b"{"})
    argv = [sys.executable, "-m", "flamingo_data", "validate", str(tmp_path), "--json", "-"]
    argv += ["--processes", processes]
    shown = subprocess.run(argv, capture_output=True, text=True)
    assert shown.returncode == 1
    assert "validate: 100%" in shown.stderr and "3/3" in shown.stderr
    assert json.loads(shown.stdout)["shards"] == 3  # the whole of stdout is the report
    quiet = subprocess.run([*argv, "--no-progress"], capture_output=True, text=True)
    assert quiet.stdout == shown.stdout
    assert "3/3" not in quiet.stderr and "validate:" not in quiet.stderr


def test_progress_counts_a_shard_when_it_finishes_not_when_its_turn_comes() -> None:
    """In parallel, shards finish out of order: each is counted on arrival, and the checks still
    come out in input order."""
    from flamingo_data.check.validate import _in_input_order

    class Bar:
        count = 0

        def update(self, n: int) -> None:
            self.count += n

    bar = Bar()
    finished = iter([(2, "c"), (1, "b"), (0, "a"), (3, "d")])
    in_order = _in_input_order(finished, bar)
    assert next(in_order) == "a"
    assert bar.count == 3  # c and b had finished before a
    assert list(in_order) == ["b", "c", "d"] and bar.count == 4
