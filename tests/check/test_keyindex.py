"""KeyIndex: the repeats of a key across shards, in 8 bytes a key, never a hash collision."""

from __future__ import annotations

import pytest

from flamingo_data.check import keyindex
from flamingo_data.check.keyindex import KeyIndex


def _index(shards: list[list[str]]) -> KeyIndex:
    index = KeyIndex()
    for keys in shards:
        index.start_shard()
        for key in keys:
            index.add(key)
    return index


def test_each_repeat_after_the_first_in_reading_order_and_only_those_shards_reread() -> None:
    shards = [["a", "b"], [], ["c", "a"], ["d"], ["b", "b", "e"]]
    read: list[int] = []

    def read_keys(shard: int) -> list[str]:
        read.append(shard)
        return shards[shard]

    found = list(_index(shards).duplicates(read_keys))
    assert found == [(2, "a"), (4, "b"), (4, "b")]
    assert read == [0, 2, 4]


def test_a_hash_collision_between_different_keys_is_not_a_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keyindex, "key_hash", len)  # every one-letter key collides
    shards = [["a", "bb"], ["c"], ["dd", "a"]]
    found = list(_index(shards).duplicates(lambda shard: shards[shard]))
    assert found == [(2, "a")]


def test_no_keys_and_no_repeats_read_nothing_again() -> None:
    def never(shard: int) -> list[str]:
        raise AssertionError(f"shard {shard} read again")

    assert list(_index([]).duplicates(never)) == []
    assert list(_index([["a"], ["b"]]).duplicates(never)) == []


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 1e6


def test_two_million_keys_cost_tens_of_megabytes_not_hundreds() -> None:
    """A set of the key strings grew by ~228 MB for 2 M MMC4-style keys."""
    keys = (f"docs_shard_{i // 4000:05d}_v2-{i % 4000:07d}" for i in range(2_000_000))
    before = _rss_mb()
    index = KeyIndex()
    index.start_shard()
    for key in keys:
        index.add(key)
    assert _rss_mb() - before < 40
    assert list(index.duplicates(lambda shard: [])) == []
