"""Deterministic sample streams: shard order, split by node and worker, shuffle buffer, weighted mix.

Every random choice comes from an rng seeded by (seed, epoch, stream id), so the stream a worker sees
is a pure function of the config. That makes resume exact: a worker replays its stream and skips the
first ``position`` samples without decoding them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flamingo_data.errors import SpecError
from flamingo_data.loader.config import DatasetSpec, LoaderConfig
from flamingo_data.storage import remote
from flamingo_data.storage.shard_reader import (
    DECODED_EXTS,
    IssueSink,
    ReadIssue,
    Sample,
    iter_samples,
)
from flamingo_data.storage.specs import expand_specs

log = logging.getLogger("flamingo_data.loader")


@dataclass(frozen=True)
class Dataset:
    """A dataset's resolved shard list, its sample count from sizes.json (None when unknown), and
    the shards its spec names that do not exist."""

    spec: DatasetSpec
    index: int
    paths: tuple[str, ...]
    size: int | None
    missing: tuple[str, ...] = ()


_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def resolve(spec: DatasetSpec, index: int) -> Dataset:
    """The dataset's shards. A named shard that does not exist is skipped with a warning and kept
    in ``missing``, so a hole in a brace list never shrinks the dataset without a word."""
    shards = [spec.shards] if isinstance(spec.shards, str) else list(spec.shards)
    named = expand_specs(shards, folder_suffix=".tar", keep_missing=True)
    present = {p for p in set(named) if remote.exists(p)}
    paths = [p for p in named if p in present]
    missing = tuple(p for p in named if p not in present)
    if not paths:
        raise SpecError(f"dataset {spec.name!r}: no shard matches {spec.shards!r}")
    if missing and (spec.name, missing) not in _WARNED:  # the trainer builds several loaders
        _WARNED.add((spec.name, missing))
        log.warning(
            "dataset %r: %d of %d named shards do not exist and are skipped (first: %s)",
            spec.name,
            len(missing),
            len(named),
            missing[0],
        )
    return Dataset(spec, index, tuple(paths), sizes_total(paths), missing)


def sizes_total(paths: list[str]) -> int | None:
    """Sum of the shards' counts in the sizes.json beside them; None if any shard is not listed
    (or its count is not a whole number >= 0)."""
    cache: dict[str, dict] = {}
    total = 0
    for path in paths:
        folder = os.path.dirname(path) or "."
        if folder not in cache:
            cache[folder] = _read_sizes(remote.join(folder, "sizes.json"))
        count = cache[folder].get(os.path.basename(path))
        if not _is_count(count):
            if count is not None:
                log.warning("%s: count %r of %s is not a whole number >= 0", folder, count, path)
            return None
        total += count
    return total


def _read_sizes(path: str) -> dict:
    """The sizes.json object, or {} (epoch length unknown) when there is none or it is malformed:
    ignored like ``validate --write-sizes`` ignores it, but said, not a crash on a list."""
    try:
        raw = remote.read_if_exists(path)
        sizes = json.loads(raw) if raw is not None else {}
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("%s is unreadable, epoch length unknown: %s", path, exc)
        return {}
    if not isinstance(sizes, dict):
        log.warning("%s is not an object {shard: count}, epoch length unknown", path)
        return {}
    return sizes


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def rng_for(config: LoaderConfig, epoch: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, epoch, *ids])


def _read(path: str, on_issue: IssueSink) -> Iterator[Sample]:
    """A shard's samples with only the members the loader decodes read: a 256 MiB video beside a
    record cost each worker +256 MB of memory only to be counted as ``unexpected_member``."""
    return iter_samples(path, on_issue, read=DECODED_EXTS)


def dataset_samples(
    ds: Dataset, config: LoaderConfig, epoch: int, slot: int, slots: int, on_issue: IssueSink
) -> Iterator[Sample]:
    """Raw samples of ``ds`` for this slot (global worker) in this epoch."""
    if config.resample:
        yield from _resampled(ds, config, epoch, slot, on_issue)
        return
    order = list(ds.paths)
    if config.shuffle_shards:
        order = [order[i] for i in rng_for(config, epoch, ds.index).permutation(len(order))]
    if len(order) >= slots:
        for path in order[slot::slots]:
            yield from _read(path, on_issue)
        return
    # Fewer shards than workers: split by sample position so no worker idles or repeats. Every
    # worker then reads every shard, so one of them (by shard index) reports each shard's read
    # issues: a truncated tar is one rejection, not one per worker.
    position = 0
    for index, path in enumerate(order):
        sink = on_issue if index % slots == slot else _ignore
        for sample in _read(path, sink):
            if position % slots == slot:
                yield sample
            position += 1


def _ignore(issue: ReadIssue) -> None:
    """Another worker reports this shard's read issues."""


def _resampled(
    ds: Dataset, config: LoaderConfig, epoch: int, slot: int, on_issue: IssueSink
) -> Iterator[Sample]:
    """Shards drawn with replacement. A shard that yields no sample is not drawn again, and when
    no shard yields one the stream ends: drawing forever without yielding would hang the worker."""
    rng = rng_for(config, epoch, ds.index, slot, 1)
    barren: set[int] = set()
    while len(barren) < len(ds.paths):
        index = int(rng.integers(len(ds.paths)))
        if index in barren:
            continue
        found = False
        for sample in _read(ds.paths[index], on_issue):
            found = True
            yield sample
        if not found:
            barren.add(index)


def shuffled(samples: Iterator[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    """A seeded shuffle buffer (size <= 1 keeps the order)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], sample = sample, buffer[i]
        yield sample
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def mixed(
    datasets: list[Dataset],
    config: LoaderConfig,
    epoch: int,
    slot: int,
    slots: int,
    on_issue: IssueSink,
) -> Iterator[tuple[str, Sample]]:
    """(dataset name, sample): datasets drawn by weight until each is exhausted (or forever if resampled)."""
    streams = []
    for ds in datasets:
        raw = dataset_samples(ds, config, epoch, slot, slots, on_issue)
        streams.append(
            shuffled(raw, config.shuffle_buffer, rng_for(config, epoch, ds.index, slot, 2))
        )
    weights = np.array([ds.spec.weight for ds in datasets], dtype=np.float64)
    active = list(range(len(datasets)))
    rng = rng_for(config, epoch, slot, 3)
    while active:
        w = weights[active] / weights[active].sum()
        choice = active[int(rng.choice(len(active), p=w))] if len(active) > 1 else active[0]
        try:
            yield datasets[choice].spec.name, next(streams[choice])
        except StopIteration:
            active.remove(choice)
