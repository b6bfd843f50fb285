"""Read WebDataset tars safely: group members into samples, never unpickle, report every problem.

Used by ``validate``, ``inspect`` and ``preview``; the loader applies the same member-name rules.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flamingo_data.storage import remote
from flamingo_data.storage.safe_tar import UnsafeTar, open_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DECODED_EXTS = frozenset(("json", "txt", *IMAGE_EXTS))


@dataclass(slots=True)
class Sample:
    """One sample: members by extension (raw bytes; nothing is decoded here)."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReadIssue:
    """A problem met while reading: ``key`` is empty for shard-level problems."""

    shard: str
    key: str
    reason: str
    detail: str = ""


IssueSink = Callable[[ReadIssue], None]


def unsafe_member_name(name: str) -> bool:
    """Absolute paths and ``..`` components could escape an extraction folder; a name that is not
    UTF-8 (tarfile keeps its bytes as lone surrogates) makes a key the loader cannot hash."""
    return (
        name.startswith("/")
        or ".." in name.split("/")
        or "\\" in name
        or name == ""
        or not _is_utf8(name)
    )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def iter_samples(
    path: str, on_issue: IssueSink, read: frozenset[str] | None = None
) -> Iterator[Sample]:
    """Samples of one tar in order; unreadable tars and bad members go to ``on_issue``, never raise.

    ``read``: the extensions whose bytes the caller uses (all when None); other members appear
    with empty bytes and are skipped unread, so a 1 GiB video in a shard costs no memory
    (validate held 2.4 GB for one only to report it as unexpected). A cut-off skipped member
    still makes the tar ``truncated_tar``: the next header or the end block is then missing.
    A local path that is not a regular file once links are followed is ``not_a_file``, refused
    before it is opened; header problems are ``oversized_header`` / ``bad_header`` (see
    :mod:`flamingo_data.storage.safe_tar`).
    """
    current: Sample | None = None
    read_any = False
    try:
        with remote.open_binary(path) as handle, open_tar(handle, "r|") as tar:
            for member in tar:
                read_any = True
                sample = _accept(path, tar, member, on_issue, read)
                if sample is None:
                    continue
                key, ext, data = sample
                if current is not None and current.key != key:
                    yield current
                    current = None
                current = current or Sample(path, key)
                if ext in current.members:
                    on_issue(ReadIssue(path, key, "duplicate_member", ext))
                current.members[ext] = data
            if (at := _require_end_marker(path, tar.offset)) is not None:
                detail = f"non-zero bytes at {at}, after the end-of-archive block (tars joined with cat?)"
                on_issue(ReadIssue(path, "", "trailing_data", detail))
    except remote.NotRegularFile as exc:
        on_issue(ReadIssue(path, "", "not_a_file", exc.strerror))
    except UnsafeTar as exc:
        on_issue(ReadIssue(path, "", exc.reason, str(exc)))
    except (tarfile.TarError, EOFError, OSError) as exc:
        on_issue(
            ReadIssue(path, "", _tar_error_reason(path, read_any), f"{type(exc).__name__}: {exc}")
        )
    if current is not None:
        yield current


def _accept(
    path: str,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    on_issue: IssueSink,
    read: frozenset[str] | None,
):
    if unsafe_member_name(member.name):
        on_issue(ReadIssue(path, member.name, "unsafe_member_name"))
        return None
    # GNU tar's entry for a folder (`tar -cf x.tar -C dir .`): no sample, no harm
    if member.isdir():
        return None
    if not member.isfile():
        on_issue(ReadIssue(path, member.name, "not_a_regular_file"))
        return None
    # A sparse member reads back with its holes filled by zeros: a 10 KiB tar gave a 64 MiB
    # member (any size can be declared), read whole into every loader worker. No writer of
    # shards makes one.
    if member.issparse():
        on_issue(ReadIssue(path, member.name, "sparse_member"))
        return None
    key, ext = split_key(member.name)
    if read is not None and ext not in read:
        return key, ext, b""
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise EOFError(f"member {member.name} is truncated")
    return key, ext, data


def _require_end_marker(path: str, offset: int) -> int | None:
    """tarfile stops quietly at a missing or cut header, so a tar cut at a member boundary (a writer
    that died, an interrupted copy) would read as complete: demand the zero block that ends a tar.

    Returns where non-zero bytes follow that block, if they do: every reader stops at the end
    block, so the samples of a second tar appended with ``cat`` would be lost without a word. The
    rest is normally a few KiB of zero padding."""
    with remote.open_binary(path) as handle:
        handle.seek(offset)
        if handle.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise EOFError(f"no end-of-archive block at byte {offset}")
        start = offset + tarfile.BLOCKSIZE
        while chunk := handle.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return start + next(i for i, byte in enumerate(chunk) if byte)
            start += len(chunk)
    return None


def _tar_error_reason(path: str, read_any: bool) -> str:
    try:
        if remote.size(path) == 0:
            return "empty_tar"
    except OSError:
        return "unreadable_tar"
    return "truncated_tar" if read_any else "not_a_tar"
