"""Expand shard/input specs: brace patterns, globs, folders, or lists of them."""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from braceexpand import braceexpand

from flamingo_data.errors import SpecError  # noqa: F401 -- importable from here too
from flamingo_data.storage import remote

_GLOB_CHARS = set("*?[")


def expand_specs(
    specs: str | Iterable[str],
    folder_suffix: str | tuple[str, ...] = ".tar",
    keep_missing: bool = False,
    unmatched: list[str] | None = None,
    ignore_case: bool = False,
    duplicates: list[str] | None = None,
    unique: bool = True,
) -> list[str]:
    """Paths named by ``specs`` in the order given, each file once (unless not ``unique``).

    A folder expands to its files ending in ``folder_suffix`` (one suffix or a tuple of them;
    sorted), a glob to its sorted matches, a brace pattern to each alternative. Paths that do not exist are dropped unless
    ``keep_missing`` (MMC4's shard list has gaps, and positions in it still matter).
    ``unmatched`` collects the alternatives (globs, folders, missing paths) that name nothing.
    ``ignore_case``: a folder's files match ``folder_suffix`` in any case (``SHARD_0.ZIP``).
    A file named again (a glob and its path, ``./x`` and ``x``, a symlink to it) is kept where it
    first appears and its later names go to ``duplicates``: read twice, its records would be
    written twice under two keys. ``unique=False`` keeps every name (validate checks a dataset as
    named, where a shard named twice is a real duplicate).
    """
    if ignore_case:
        folder_suffix = tuple(s.lower() for s in _as_tuple(folder_suffix))
    if isinstance(specs, str):
        specs = [specs]
    paths: list[str] = []
    for spec in specs:
        for item in braceexpand(spec):
            found = _expand_one(item, folder_suffix, keep_missing, ignore_case)
            if not found and unmatched is not None:
                unmatched.append(item)
            paths.extend(found)
    return _first_of_each(paths, duplicates) if unique else paths


def _first_of_each(paths: list[str], duplicates: list[str] | None) -> list[str]:
    """``paths`` without the later names of a file already listed (see ``file_identity``)."""
    kept: dict[str, str] = {}
    for path in paths:
        identity = file_identity(path)
        if identity not in kept:
            kept[identity] = path
        elif duplicates is not None:
            duplicates.append(path)
    return list(kept.values())


def file_identity(path: str) -> str:
    """What two names of one file share: the resolved real path of a local file (symlinks, ``.``
    and ``..`` followed); for a remote one the url with its path normalised and its scheme (and
    an http host, which is case-blind) in lower case."""
    if not remote.is_remote(path):
        return os.path.realpath(remote.local_form(path))
    parts = urlsplit(path)
    scheme = parts.scheme.lower()
    host = parts.netloc.lower() if scheme in ("http", "https") else parts.netloc
    clean = posixpath.normpath(parts.path) if parts.path else ""
    return urlunsplit((scheme, host, clean, parts.query, ""))


def lists_folder_or_glob(specs: str | Iterable[str]) -> bool:
    """True when some alternative of ``specs`` is a folder or a glob: the files it finds are
    sorted matches, so their positions in the list say nothing of which files exist."""
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in braceexpand(spec):
            if _GLOB_CHARS & set(item) or remote.isdir(item):
                return True
    return False


def _as_tuple(suffix: str | tuple[str, ...]) -> tuple[str, ...]:
    return (suffix,) if isinstance(suffix, str) else suffix


def _matches(name: str, suffix: str | tuple[str, ...], ignore_case: bool) -> bool:
    return (name.lower() if ignore_case else name).endswith(suffix)


def _expand_one(
    item: str, folder_suffix: str | tuple[str, ...], keep_missing: bool, ignore_case: bool
) -> list[str]:
    if remote.is_remote(item):
        return _expand_remote(item, folder_suffix, keep_missing, ignore_case)
    if os.path.isdir(item):
        names = sorted(n for n in os.listdir(item) if _matches(n, folder_suffix, ignore_case))
        return [os.path.join(item, n) for n in names]
    if _GLOB_CHARS & set(item):
        return sorted(glob.glob(item))
    if keep_missing or os.path.exists(item):
        return [item]
    return []


def _expand_remote(
    item: str, folder_suffix: str | tuple[str, ...], keep_missing: bool, ignore_case: bool
) -> list[str]:
    """The same rules through fsspec (s3://, gs://, hdfs://, memory://, ...)."""
    if _GLOB_CHARS & set(item):
        return sorted(remote.glob(item))
    if remote.isdir(item):
        return sorted(p for p in remote.listdir(item) if _matches(p, folder_suffix, ignore_case))
    return [item] if keep_missing or remote.exists(item) else []


def missing_folder(parameter: str, path: str) -> str:
    """Why ``path``, given as the folder ``parameter``, is not one: a file, or nothing there."""
    what = "is a file, not a folder" if remote.isfile(path) else "does not exist"
    return f"`{parameter}` {path} {what}"
