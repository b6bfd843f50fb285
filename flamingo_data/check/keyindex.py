"""Duplicate sample keys across a whole dataset, found in 8 bytes a key.

A set of the key strings took ~114 bytes a key: 11 GB to validate MMC4's ~100 M documents. Here
each key leaves only its 64-bit hash; hashes seen twice name the few shards to read again (member
names only, no bytes), where the real keys settle which are duplicates: a hash collision between
different keys is never reported.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator

import numpy as np


def key_hash(key: str) -> int:
    """Python's own str hash: computed once per string, stable within one process."""
    return hash(key)


class KeyIndex:
    """Keys in reading order, shard by shard; ``duplicates`` lists each repeat after the first."""

    def __init__(self) -> None:
        self._hashes = array("q")
        self._shard_starts: list[int] = []

    def start_shard(self) -> None:
        self._shard_starts.append(len(self._hashes))

    def add(self, key: str) -> None:
        self._hashes.append(key_hash(key))

    def duplicates(self, read_keys: Callable[[int], Iterable[str]]) -> Iterator[tuple[int, str]]:
        """(shard number, key) for every key met before, in reading order. ``read_keys(n)`` gives
        shard n's keys again, in the same order; only shards holding a repeated hash are read."""
        candidates, shards = self._candidates()
        seen: set[str] = set()
        for shard in shards:
            for key in read_keys(shard):
                if key_hash(key) not in candidates:
                    continue
                if key in seen:
                    yield shard, key
                seen.add(key)

    def _candidates(self) -> tuple[set[int], list[int]]:
        """(hashes met more than once, the shards that hold them, in order)."""
        hashes = (
            np.frombuffer(self._hashes, dtype=np.int64) if self._hashes else np.empty(0, np.int64)
        )
        ordered = np.sort(hashes)
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not repeated.size:
            return set(), []
        positions = np.flatnonzero(np.isin(hashes, repeated))
        starts = np.asarray(self._shard_starts, dtype=np.int64)
        shards = np.unique(np.searchsorted(starts, positions, side="right") - 1)
        return set(repeated.tolist()), shards.tolist()
