"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed."""

from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def commit_file(tmp: Path, final: Path, fsync: bool = True) -> None:
    """fsync then rename, so ``final`` is either absent or complete. Without ``fsync`` only the
    rename is atomic: a power loss may leave an empty or partial file under the final name."""
    if not fsync:
        os.replace(tmp, final)
        return
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """``data`` at ``path``, whole or not at all (``commit_file``)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    commit_file(tmp, path, fsync)
