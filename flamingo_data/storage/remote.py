"""Paths that may be remote: ``s3://``, ``gs://``, ``hdfs://``, ``memory://`` ... through fsspec.

Plain local paths take the fast path (os/open) so local conversions pay nothing for this: fsspec
is imported only when a remote path is used.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import IO

from flamingo_data.errors import RemoteUnavailable  # noqa: F401 -- importable from here too


def is_remote(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_form(path: str) -> str:
    """A ``file://`` url as the local path it names (``file:///data/out`` -> ``/data/out``);
    anything else unchanged. Taken as a plain path, ``--out file:///data/out`` was written
    into ``./file:/data/out`` under the working folder."""
    return path.removeprefix("file://") if isinstance(path, str) else path


def _fs(path: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as exc:
        raise RemoteUnavailable(f"cannot use {path}: {exc}") from exc
    except ValueError as exc:  # fsspec: "Protocol not known: foo"
        raise RemoteUnavailable(f"cannot use {path}: {exc}") from exc


def join(base: str | os.PathLike, *parts: str) -> str:
    return (
        posixpath.join(base, *parts) if is_remote(base) else os.path.join(os.fspath(base), *parts)
    )


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.exists(inner)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, inner = _fs(path)
    return fs.isfile(inner)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, inner = _fs(path)
    return fs.isdir(inner)


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes, at most ``limit`` of them; FileNotFoundError when absent, like a local
    read. Only regular local files are opened: opening a FIFO blocks until something writes to it
    (a converter would wait forever on one among its images)."""
    if not is_remote(path):
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
        with open(path, "rb") as handle:
            # read(n) allocates n bytes up front: 70 us an image for a 128 MiB limit
            small = limit is None or info.st_size < limit
            return handle.read() if small else handle.read(limit)
    fs, inner = _fs(path)
    return fs.cat_file(inner) if limit is None else fs.cat_file(inner, start=0, end=limit)


class NotRegularFile(OSError):
    """A local path (after following links) that is a FIFO, device, socket or directory: opening
    or reading one can block forever (a FIFO) or never end (``/dev/zero``)."""


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` names, in words ("a FIFO (named pipe)"); "a regular file" for one."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((words for test, words in _FILE_KINDS if test(mode)), "not a regular file")


def _refuse_unless_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = file_kind(mode)
        raise NotRegularFile(errno.EINVAL, f"is {kind}, not a regular file", path)


def open_binary(path: str) -> IO[bytes]:
    """A binary reader of ``path``. A local path must be a regular file once links are followed
    (else :class:`NotRegularFile`); it is checked before opening and again on the open descriptor,
    which is opened non-blocking so a FIFO swapped in between cannot block the open."""
    if is_remote(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    _refuse_unless_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def listdir(path: str) -> list[str]:
    if not is_remote(path):
        return [os.path.join(path, n) for n in os.listdir(path)]
    fs, inner = _fs(path)
    return [_as_given(fs.unstrip_protocol(p), path) for p in fs.ls(inner, detail=False)]


def glob(pattern: str) -> list[str]:
    fs, inner = _fs(pattern)
    return [_as_given(fs.unstrip_protocol(p), pattern) for p in fs.glob(inner)]


def _as_given(url: str, like: str) -> str:
    """``url`` under the protocol the user wrote: fsspec names ``local://`` paths ``file://``,
    which this module treats as plain local paths."""
    if "://" not in like or "://" not in url:
        return url
    protocol = like.split("://", 1)[0]
    return url if url.startswith(f"{protocol}://") else f"{protocol}://{url.split('://', 1)[1]}"


def write_bytes(path: str, data: bytes) -> None:
    """One object put: object stores make it visible whole or not at all."""
    fs, inner = _fs(path)
    fs.makedirs(fs._parent(inner), exist_ok=True)  # a no-op on object stores
    fs.pipe_file(inner, data)


def put_file(local: str | os.PathLike, path: str) -> None:
    """Upload a local file (a finished shard) to ``path``."""
    fs, inner = _fs(path)
    fs.makedirs(fs._parent(inner), exist_ok=True)
    fs.put_file(os.fspath(local), inner)


def remove(path: str) -> None:
    """Delete ``path`` if it exists."""
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm_file(inner)


def makedirs(path: str) -> None:
    fs, inner = _fs(path)
    fs.makedirs(inner, exist_ok=True)


def remove_tree(path: str) -> None:
    """Delete a folder and everything under it, if it exists."""
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def read_if_exists(path: str) -> bytes | None:
    """The file's bytes, or None when there is no such file (sidecars are optional)."""
    try:
        return read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, inner = _fs(path)
    return fs.size(inner)


def write_file(path: str, data: bytes) -> None:
    """Atomic rename for a local path, one object put for a remote one."""
    if is_remote(path):
        write_bytes(path, data)
        return
    from pathlib import Path

    from flamingo_data.storage.atomic import write_atomic

    write_atomic(Path(path), data)
