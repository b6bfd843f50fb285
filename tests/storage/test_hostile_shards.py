"""Nothing hangs on an untrusted shard: hostile tar headers and paths that are not regular files.

Every reader of shards (validate, inspect, the loader, img2dataset output indexing) goes through
``remote.open_binary`` and ``tarsafe.open_tar``; each case here must end with a per-shard reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds

from flamingo_data.check.inspect import inspect_shards
from flamingo_data.check.preview import write_preview
from flamingo_data.check.validate import validate_shards
from flamingo_data.fetch.i2d_output import member_offsets
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
from flamingo_data.storage.remote import NotRegularFile
from flamingo_data.storage.safe_tar import UnsafeTar
from tests.loader_data import simple_docs, write_json_shard

pytestmark = pytest.mark.timeout(60)

LOADER_CONFIG = LoaderConfig(batch_size=2, image_size=32, shuffle_buffer=1, seed=3)
NUL = b"\0"


def _header(name: str, typeflag: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = typeflag, size
    return info.tobuf(format=tarfile.GNU_FORMAT)  # base-256 sizes beyond 8 GiB


def _padded(data: bytes) -> bytes:
    return data + NUL * (-len(data) % tarfile.BLOCKSIZE)


def _entry(name: str, typeflag: bytes, body: bytes) -> bytes:
    return _header(name, typeflag, len(body)) + _padded(body)


def _record(keyword: str, value: str) -> bytes:
    """A well-formed pax record: its length counts its own digits."""
    rest = f" {keyword}={value}\n".encode()
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return str(length).encode() + rest


GOOD_JSON = json.dumps(next(iter(simple_docs(1).values()))).encode()
MEMBER = _entry("h0001.json", tarfile.REGTYPE, GOOD_JSON)
END = NUL * 1024


def _pax(typeflag: bytes, body: bytes) -> bytes:
    return _entry("././@PaxHeader", typeflag, body) + MEMBER + END


def _gnu_long(typeflag: bytes, size: int) -> bytes:
    return _entry("././@LongLink", typeflag, b"a" * size + b".json\0") + MEMBER + END


def _old_gnu_sparse_cut() -> bytes:
    """A GNU 'S' header that announces an extension block the file does not hold."""
    block = bytearray(_header("s.json", tarfile.GNUTYPE_SPARSE, 0))
    block[482] = 1
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


# name -> (tar bytes, the shard-level reason every reader must give)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "pax_x_digits_200k": (lambda: _pax(tarfile.XHDTYPE, b"1" * 200_000), "oversized_header"),
    "pax_x_digits_1m": (lambda: _pax(tarfile.XHDTYPE, b"1" * 1_000_000), "oversized_header"),
    "pax_g_digits_200k": (lambda: _pax(tarfile.XGLTYPE, b"1" * 200_000), "oversized_header"),
    "pax_g_digits_1m": (lambda: _pax(tarfile.XGLTYPE, b"1" * 1_000_000), "oversized_header"),
    "pax_x_digits_within_cap": (lambda: _pax(tarfile.XHDTYPE, b"1" * 60_000), "bad_header"),
    "pax_g_digits_within_cap": (lambda: _pax(tarfile.XGLTYPE, b"1" * 60_000), "bad_header"),
    "pax_length_zero": (lambda: _pax(tarfile.XHDTYPE, b"0 path=a\n"), "bad_header"),
    "pax_length_past_body": (lambda: _pax(tarfile.XHDTYPE, b"99 path=a\n"), "bad_header"),
    "pax_length_short": (lambda: _pax(tarfile.XHDTYPE, b"5 path=ab.json\n"), "bad_header"),
    "pax_length_not_at_newline": (lambda: _pax(tarfile.XHDTYPE, b"10 path=ab\n"), "bad_header"),
    "pax_length_not_digits": (lambda: _pax(tarfile.XHDTYPE, b"x1 path=a\n"), "bad_header"),
    "pax_length_too_long": (lambda: _pax(tarfile.XHDTYPE, b"1" * 30 + b" path=a\n"), "bad_header"),
    "pax_no_equals": (lambda: _pax(tarfile.XHDTYPE, b"12 novalue12\n"), "bad_header"),
    "pax_many_global_records": (
        lambda: _pax(tarfile.XGLTYPE, b"".join(_record(f"k{i}", "1") for i in range(100))),
        "oversized_header",
    ),
    "pax_chained": (
        lambda: _entry("p", tarfile.XHDTYPE, _record("path", "a.json")) * 20 + MEMBER + END,
        "bad_header",
    ),
    "pax_size_past_end": (
        lambda: (
            _entry("p", tarfile.XHDTYPE, _record("size", "1" + "0" * 30))
            + _header("h0001.mp4", tarfile.REGTYPE, 0)
            + END
        ),
        "truncated_tar",
    ),
    "ustar_size_past_end": (
        lambda: _header("h0001.mp4", tarfile.REGTYPE, 2**80) + END,
        "truncated_tar",
    ),
    "gnu_longname_over_cap": (
        lambda: _gnu_long(tarfile.GNUTYPE_LONGNAME, 100_000),
        "oversized_header",
    ),
    "gnu_longlink_over_cap": (
        lambda: _gnu_long(tarfile.GNUTYPE_LONGLINK, 100_000),
        "oversized_header",
    ),
    "gnu_longname_chained": (
        lambda: _entry("././@LongLink", tarfile.GNUTYPE_LONGNAME, b"ab\0") * 50 + MEMBER + END,
        "bad_header",
    ),
    "gnu_old_sparse_cut": (_old_gnu_sparse_cut, "bad_header"),
}


def _dataset(folder: Path, hostile: str, data: bytes) -> dict[str, dict]:
    """``folder`` with one good shard and the hostile tar ``hostile``; the good shard's docs."""
    docs = _good_shard(folder)
    (folder / hostile).write_bytes(data)
    return docs


def _good_shard(folder: Path) -> dict[str, dict]:
    """Three documents in ``good-00000.tar``, with no sizes.json (it would not list the others)."""
    docs = simple_docs(3)
    write_json_shard(folder, "good", docs)
    (folder / "sizes.json").unlink()
    return docs


def _shard_reasons(report, shard: str) -> set[str]:
    return {f.reason for f in report.failures if f.shard == shard and not f.key}


def _loader_keys_and_rejections(folder: Path) -> tuple[list[str], dict[str, int]]:
    loader = build_loader([DatasetSpec("d", str(folder))], make_tokenizer(None), LOADER_CONFIG)
    keys = [key for batch in loader for key in batch["keys"]]
    return keys, dict(loader.rejections())


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_validate_refuses_a_hostile_header_with_its_reason(tmp_path: Path, case: str) -> None:
    build, reason = HOSTILE[case]
    _dataset(tmp_path, "hostile.tar", build())
    report = validate_shards(str(tmp_path))
    assert _shard_reasons(report, "hostile.tar") == {reason}
    assert report.sizes["good-00000.tar"] == 3


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_loader_counts_a_hostile_header_and_keeps_the_good_shard(
    tmp_path: Path, case: str
) -> None:
    build, reason = HOSTILE[case]
    docs = _dataset(tmp_path, "hostile.tar", build())
    keys, rejections = _loader_keys_and_rejections(tmp_path)
    assert sorted(keys) == sorted(docs)
    assert rejections == {reason: 1}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_inspect_counts_a_hostile_header(tmp_path: Path, case: str) -> None:
    build, reason = HOSTILE[case]
    _dataset(tmp_path, "hostile.tar", build())
    report = inspect_shards(str(tmp_path))
    assert report.read_issues == {reason: 1} and report.documents == 3


@pytest.mark.parametrize("case", ["pax_x_digits_1m", "pax_g_digits_1m", "ustar_size_past_end"])
def test_img2dataset_output_indexing_refuses_a_hostile_header(tmp_path: Path, case: str) -> None:
    build, reason = HOSTILE[case]
    (tmp_path / "00000.tar").write_bytes(build())
    with pytest.raises(UnsafeTar) as caught:
        member_offsets(tmp_path / "00000.tar")
    assert caught.value.reason == reason


def test_validate_cli_on_every_hostile_header_finishes_with_one_line_each(tmp_path: Path) -> None:
    """The CVE-2024-6232 shapes took minutes each on Python 3.11.7's tarfile, the sizes past the
    end forever; here the whole folder must finish well inside the subprocess timeout."""
    for case, (build, _) in HOSTILE.items():
        (tmp_path / f"{case}.tar").write_bytes(build())
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "validate", str(tmp_path), "--json", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    failures = json.loads(result.stdout)["failures"]
    assert {f["shard"]: f["reason"] for f in failures} == {
        f"{case}.tar": reason for case, (_, reason) in HOSTILE.items()
    }
    assert len(failures) == len(HOSTILE) and all("\n" not in f["detail"] for f in failures)


# --- paths that are not regular files --------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    """A listening unix socket at ``path`` (bound by relative name: socket paths are short)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path.name)
    finally:
        os.chdir(here)
    _SOCKETS.append(sock)


_SOCKETS: list[socket.socket] = []


def _symlink_to_fifo(path: Path) -> None:
    os.mkfifo(path.parent / "pipe")
    path.symlink_to(path.parent / "pipe")


NOT_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (_fifo, "a FIFO (named pipe)"),
    "symlink_to_dev_zero": (lambda p: p.symlink_to("/dev/zero"), "a character device"),
    "symlink_to_dev_null": (lambda p: p.symlink_to("/dev/null"), "a character device"),
    "directory": (lambda p: p.mkdir(), "a directory"),
    "socket": (_socket, "a socket"),
    "symlink_to_fifo": (_symlink_to_fifo, "a FIFO (named pipe)"),
}


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _SOCKETS:
        _SOCKETS.pop().close()


def _not_file_dataset(folder: Path, kind: str) -> dict[str, dict]:
    docs = _good_shard(folder)
    NOT_FILES[kind][0](folder / "x.tar")
    return docs


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_validate_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    _not_file_dataset(tmp_path, kind)
    report = validate_shards(str(tmp_path))
    failures = [f for f in report.failures if f.shard == "x.tar"]
    assert [(f.key, f.reason) for f in failures] == [("", "not_a_file")]
    assert NOT_FILES[kind][1] in failures[0].detail
    assert report.sizes == {"good-00000.tar": 3}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_the_loader_counts_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    docs = _not_file_dataset(tmp_path, kind)
    keys, rejections = _loader_keys_and_rejections(tmp_path)
    assert sorted(keys) == sorted(docs) and rejections == {"not_a_file": 1}


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_inspect_counts_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    _not_file_dataset(tmp_path, kind)
    report = inspect_shards(str(tmp_path))
    assert report.read_issues == {"not_a_file": 1} and report.documents == 3


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_preview_names_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    _not_file_dataset(tmp_path, kind)
    result = write_preview(str(tmp_path), str(tmp_path / "page.html"))
    assert result.documents == 3
    assert [(i.shard, i.reason) for i in result.shard_issues] == [
        (str(tmp_path / "x.tar"), "not_a_file")
    ]


@pytest.mark.parametrize("case", ["fifo", "pax_x_digits_1m"])
def test_preview_cli_of_nothing_readable_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    if case in NOT_FILES:
        NOT_FILES[case][0](tmp_path / "x.tar")
    else:
        (tmp_path / "x.tar").write_bytes(HOSTILE[case][0]())
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "preview", str(tmp_path / "x.tar")]
        + ["--out", str(tmp_path / "page.html")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "no document to preview" in result.stderr and not (tmp_path / "page.html").exists()


@pytest.mark.parametrize("kind", ["fifo", "symlink_to_dev_zero"])
def test_img2dataset_output_indexing_refuses_what_is_not_a_regular_file(
    tmp_path: Path, kind: str
) -> None:
    NOT_FILES[kind][0](tmp_path / "00000.tar")
    with pytest.raises(NotRegularFile, match=re.escape(NOT_FILES[kind][1])):
        member_offsets(tmp_path / "00000.tar")


def test_validate_cli_on_a_folder_of_things_that_are_not_files(tmp_path: Path) -> None:
    """One line per entry, exit 1, within the timeout: a FIFO blocked the open forever and a
    link to /dev/zero was read forever. Dangling links and loops name no shard: missing."""
    _good_shard(tmp_path)
    for kind, (make, _) in NOT_FILES.items():
        make(tmp_path / f"{kind}.tar")
    (tmp_path / "dangling.tar").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop.tar").symlink_to(tmp_path / "loop.tar")
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for kind, (_, words) in NOT_FILES.items():
        assert [line for line in lines if line.strip().startswith(f"{kind}.tar ")] == [
            f"  {kind}.tar <shard>: not_a_file is {words}, not a regular file"
        ]
    for name in ("dangling.tar", "loop.tar"):
        assert any(line.strip().startswith(f"{name} <shard>: missing_shard") for line in lines)


def test_a_symlink_to_a_regular_shard_still_reads(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = write_json_shard(tmp_path / "real", "good", simple_docs(2))
    (tmp_path / "link.tar").symlink_to(real)
    report = validate_shards(str(tmp_path / "link.tar"))
    assert report.sizes == {"link.tar": 2}


# --- legitimate extended headers still read ---------------------------------------------------

NAMES = {
    "non_ascii": "dökümän_日本",
    "long": "d" * 150,
    "long_non_ascii": "é" * 120,
    "deep_folder": "/".join(["folder"] * 30) + "/doc",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_webdataset_tarwriter_pax_names_still_read(tmp_path: Path, name: str) -> None:
    key = NAMES[name]
    record = json.dumps(next(iter(simple_docs(1).values()))).encode()
    with wds.TarWriter(str(tmp_path / "wds.tar")) as sink:
        sink.write({"__key__": key, "json": record})
        sink.write({"__key__": key + "_2", "json": record})
    report = validate_shards(str(tmp_path / "wds.tar"))
    assert report.sizes == {"wds.tar": 2} and not _shard_reasons(report, "wds.tar")
    keys, rejections = _loader_keys_and_rejections(tmp_path)
    assert sorted(keys) == sorted([key, key + "_2"]) and rejections == {}


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tarfile_extended_headers_still_read(tmp_path: Path, tar_format: int) -> None:
    """A git-archive-like global comment, a pax mtime with a fraction, long and non-ASCII names."""
    record = json.dumps(next(iter(simple_docs(1).values()))).encode()
    keys = ["k" * 200, "ñame", "plain"]
    glob = {"comment": "0123456789abcdef" * 3} if tar_format == tarfile.PAX_FORMAT else {}
    with tarfile.open(tmp_path / "t.tar", "w", format=tar_format, pax_headers=glob) as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.json")
            info.size, info.mtime = len(record), 1_700_000_000.25
            tar.addfile(info, io.BytesIO(record))
    report = validate_shards(str(tmp_path / "t.tar"))
    assert report.sizes == {"t.tar": 3} and not _shard_reasons(report, "t.tar")
    assert set(member_offsets(tmp_path / "t.tar")) == set(keys)


@pytest.mark.parametrize("keyword", ["comment", "path"])
def test_valid_pax_records_near_the_cap_read_in_linear_time(tmp_path: Path, keyword: str) -> None:
    """A well-formed record of 65,000 digits: Python 3.11.7's tarfile spent over 30 s on each
    such header (its hdrcharset search is quadratic on digit runs); eight of them must read whole
    inside the test timeout."""
    docs = list(simple_docs(8).values())
    shard = b""
    for index, record in enumerate(docs):
        key = f"{index}" + "1" * 65_000 if keyword == "path" else f"h{index}"
        body = _record(keyword, f"{key}.json" if keyword == "path" else "1" * 65_000)
        shard += _entry("p", tarfile.XHDTYPE, body)
        shard += _entry(f"h{index}.json", tarfile.REGTYPE, json.dumps(record).encode())
    (tmp_path / "long.tar").write_bytes(shard + END)
    report = validate_shards(str(tmp_path / "long.tar"))
    assert report.sizes == {"long.tar": 8} and not _shard_reasons(report, "long.tar")
    keys, rejections = _loader_keys_and_rejections(tmp_path)
    assert len(keys) == 8 and rejections == {}
