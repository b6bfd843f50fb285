"""Expand shard/input specs: brace patterns, globs, folders, or lists of them."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from braceexpand import braceexpand

from flamingo_data import remote
from flamingo_data.errors import SpecError  # noqa: F401 -- importable from here too

_GLOB_CHARS = set("*?[")


def expand_specs(
    specs: str | Iterable[str],
    folder_suffix: str | tuple[str, ...] = ".tar",
    keep_missing: bool = False,
    unmatched: list[str] | None = None,
    ignore_case: bool = False,
) -> list[str]:
    """Paths named by ``specs`` in the order given.

    A folder expands to its files ending in ``folder_suffix`` (one suffix or a tuple of them;
    sorted), a glob to its sorted matches, a brace pattern to each alternative. Paths that do not exist are dropped unless
    ``keep_missing`` (MMC4's shard list has gaps, and positions in it still matter).
    ``unmatched`` collects the alternatives (globs, folders, missing paths) that name nothing.
    ``ignore_case``: a folder's files match ``folder_suffix`` in any case (``SHARD_0.ZIP``).
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
    return paths


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
