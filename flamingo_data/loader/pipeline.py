"""The loader object: worker-side batching with positions and rejection counts, main-side bookkeeping.

Each batch comes from one worker and carries that worker's stream position and the rejections it
counted since its previous batch. The main process keeps the last delivered position per worker,
which workers have finished, and which worker delivers next: that is the resumable state (samples
prefetched but not delivered are simply produced again, in the order they would have come).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flamingo_data.errors import EmptyDataset, InputError
from flamingo_data.loader.config import DatasetSpec, LoaderConfig
from flamingo_data.loader.imageproc import padded_uint8, vision_batch
from flamingo_data.loader.interleaved import Reject
from flamingo_data.loader.sample import TextContext, preprocess, sample_rng
from flamingo_data.loader.stream import Dataset, mixed, resolve
from flamingo_data.loader.tokenizer import check_offsets, special_ids
from flamingo_data.storage.shard_reader import DECODED_EXTS, ReadIssue

log = logging.getLogger("flamingo_data.loader")
LOG_EVERY_S = 30.0


class _WorkerStream(IterableDataset):
    """What runs inside each DataLoader worker (or in-process when num_workers is 0)."""

    def __init__(
        self,
        datasets: list[Dataset],
        tokenizer,
        config: LoaderConfig,
        epoch: int,
        rank: int,
        world_size: int,
        resume: _Resume,
        limit: int | None,
    ) -> None:
        self.datasets, self.tokenizer, self.config = datasets, tokenizer, config
        self.epoch, self.rank, self.world_size, self.resume, self.limit = (
            epoch,
            rank,
            world_size,
            resume,
            limit,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = max(1, self.config.num_workers)
        # The DataLoader always asks worker 0 first, then cycles: rotate which slot each worker
        # plays so that the cycle resumes at the worker that was due next.
        local = ((info.id if info is not None else 0) + self.resume.next_worker) % workers
        slot = self.rank * workers + local
        if slot in self.resume.ended:
            yield _end_marker(slot, self.resume.positions.get(slot, 0), Counter())
            return
        yield from self._batches(slot, self.world_size * workers)

    def _batches(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        text = TextContext.of(self.tokenizer)
        rejections: Counter = Counter()
        on_issue = lambda issue: rejections.update([issue.reason])  # noqa: E731
        batch: list[dict[str, Any]] = []
        position, start = 0, self.resume.positions.get(slot, 0)
        # The resampling limit counts delivered samples, so every slot (and rank) gets as many
        # batches whatever it rejects; ``refused`` counts rejections since the last kept sample.
        delivered, refused = self.resume.delivered.get(slot, 0), 0
        for name, sample in mixed(self.datasets, self.config, self.epoch, slot, slots, on_issue):
            if self.limit is not None and delivered >= self.limit:
                break
            position += 1
            if position <= start:
                if position == start:
                    rejections.clear()  # read issues met while replaying were counted already
                continue
            out = self._one(name, sample, text, rejections)
            if out is not None:
                batch.append(out)
                delivered, refused = delivered + 1, 0
            elif self.limit is not None:
                refused += 1
                _check_refused(refused, rejections)
            if len(batch) == self.config.batch_size:
                yield _collate(batch, text.ids["pad"], slot, position, rejections)
                batch, rejections = [], Counter()
        if batch and not self.config.drop_last:
            # Its rejections include read issues after its last sample: the slot is done with it.
            yield {**_collate(batch, text.ids["pad"], slot, position, rejections), "_last": True}
            rejections = Counter()
        yield _end_marker(slot, max(position, start), rejections)

    def _one(
        self, name: str, sample, text: TextContext, rejections: Counter
    ) -> dict[str, Any] | None:
        unexpected = set(sample.members) - DECODED_EXTS
        if unexpected:
            rejections.update(["unexpected_member"] * len(unexpected))
            sample.members = {k: v for k, v in sample.members.items() if k in DECODED_EXTS}
        try:
            return preprocess(
                sample,
                name,
                text,
                self.config,
                sample_rng(self.config.seed, self.epoch, sample.key),
            )
        except Reject as reject:
            rejections[reject.args[0]] += 1
            return None


MAX_REFUSED_IN_A_ROW = 10_000


def _check_refused(refused: int, rejections: Counter) -> None:
    """Resampling never runs out of samples: without this, shards whose every sample is rejected
    would keep a worker reading forever without delivering a batch."""
    if refused >= MAX_REFUSED_IN_A_ROW:
        raise EmptyDataset(
            f"{refused} samples in a row rejected while resampling (latest reasons: "
            f"{dict(rejections.most_common(5))}): these shards hold no usable sample"
        )


@dataclass(frozen=True)
class _Resume:
    """Where each worker slot stopped: last delivered position, samples delivered, finished slots,
    and the local worker (0 .. num_workers - 1) whose batch comes next."""

    positions: dict[int, int] = field(default_factory=dict)
    delivered: dict[int, int] = field(default_factory=dict)
    ended: frozenset[int] = frozenset()
    next_worker: int = 0


def _end_marker(slot: int, position: int, rejections: Counter) -> dict[str, Any]:
    """A worker's last item: its final position and the rejections after its last batch."""
    return {"_slot": slot, "_position": position, "_rejections": dict(rejections), "_end": True}


def _shared_buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised room for the batch's pixels; in a DataLoader worker it is allocated in shared
    memory directly (as torch's default_collate does) so that sending it is not one more copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(shape)


def _collate(
    samples: list[dict[str, Any]], pad_id: int, slot: int, position: int, rejections: Counter
) -> dict[str, Any]:
    """Worker side: uint8 pixels back to back plus counts; ``_finish_batch`` builds vision_x.

    Sending uint8 without padding slots moves ~10x fewer bytes through shared memory than the
    padded float32 vision_x (29 MB per batch of 8 at 6 x 224 px), whose page faults dominated.
    """
    counts = [s["pixels"].shape[0] for s in samples]
    first = samples[0]["pixels"]
    pixels = _shared_buffer(first, (sum(counts), *first.shape[1:]))
    torch.cat([s["pixels"] for s in samples], out=pixels)
    n_tokens = max(s["input_ids"].shape[0] for s in samples)
    lang = torch.full((len(samples), n_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), n_tokens), dtype=torch.long)
    labels = torch.full((len(samples), n_tokens), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        length = s["input_ids"].shape[0]
        lang[i, :length], mask[i, :length], labels[i, :length] = (
            s["input_ids"],
            s["attention_mask"],
            s["labels"],
        )
    return {
        "_pixels": pixels,
        "_image_counts": counts,
        "_image_slots": max(s["pad_images"] for s in samples),
        "lang_x": lang,
        "attention_mask": mask,
        "labels": labels,
        "keys": [s["key"] for s in samples],
        "dataset": [s["dataset"] for s in samples],
        "_slot": slot,
        "_position": position,
        "_rejections": dict(rejections),
        "_special_token_text": sum(s.get("special_token_text", 0) > 0 for s in samples),
    }


def _finish_batch(batch: dict[str, Any], config: LoaderConfig) -> dict[str, Any]:
    """Main side: ``vision_x`` [B, T, 1, 3, S, S] first, as the model takes it: normalized float32,
    or with ``pixels="uint8"`` the pixels as they are plus ``image_counts`` for
    ``normalize_vision`` on the device."""
    pixels, counts, slots = (batch.pop(k) for k in ("_pixels", "_image_counts", "_image_slots"))
    if config.pixels == "uint8":
        vision = padded_uint8(pixels, counts, slots)
        return {"vision_x": vision, "image_counts": torch.tensor(counts), **batch}
    return {"vision_x": vision_batch(pixels, counts, slots, config.mean, config.std), **batch}


class FlamingoLoader:
    """Iterable over one epoch of batches; ``set_epoch``, ``state_dict``/``load_state_dict``, ``rejections``."""

    def __init__(
        self,
        specs: list[DatasetSpec],
        tokenizer,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.datasets = [resolve(spec, i) for i, spec in enumerate(specs)]
        self.tokenizer, self.config, self.rank, self.world_size = (
            tokenizer,
            config,
            rank,
            world_size,
        )
        special_ids(tokenizer)  # fail now, not in a worker, if the special tokens are missing
        check_offsets(tokenizer, config.loss_on)
        self.epoch = 0
        self._positions: dict[int, int] = {}
        self._delivered: dict[int, int] = {}
        self._ended: set[int] = set()
        self._next_worker = 0
        self._rejections: Counter = Counter()
        self._text_changes: Counter = Counter()
        self._last_log = 0.0

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.config.num_workers)

    @property
    def samples_per_epoch(self) -> int | None:
        """From the config, else sizes.json (all datasets together, all ranks together)."""
        if self.config.samples_per_epoch is not None:
            return self.config.samples_per_epoch
        sizes = [ds.size for ds in self.datasets]
        return None if any(s is None for s in sizes) else sum(sizes)

    def batches_per_epoch(self) -> int | None:
        """This rank's batches per epoch. Exact when resampling: each worker delivers its share of
        samples_per_epoch, so every rank gets as many. Otherwise an estimate that ranks may not
        share: whole shards go to each worker, each worker ends with a partial batch, and
        rejections make it smaller."""
        total, batch = self.samples_per_epoch, self.config.batch_size
        if total is None:
            return None
        if self.config.resample:
            rounding = math.floor if self.config.drop_last else math.ceil
            return max(1, self.config.num_workers) * rounding(self._slot_limit() / batch)
        return math.ceil(total / self.world_size / batch)

    def _slot_limit(self) -> int:
        """Samples each worker slot delivers per resampled epoch."""
        if self.samples_per_epoch is None:
            raise InputError("resampling needs samples_per_epoch (or sizes.json beside the shards)")
        return math.ceil(self.samples_per_epoch / self.slots)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._positions, self._delivered, self._ended, self._next_worker = {}, {}, set(), 0
        self.epoch = epoch

    def rejections(self) -> dict[str, int]:
        return dict(self._rejections)

    def missing_shards(self) -> dict[str, list[str]]:
        """Shards each dataset's spec names that do not exist (skipped, with a warning at start)."""
        return {ds.spec.name: list(ds.missing) for ds in self.datasets if ds.missing}

    def text_changes(self) -> dict[str, int]:
        """Delivered samples whose source text was changed, by change: ``special_token_text`` (a
        literal special-token string, e.g. ``<image>`` in web text, broken so it stays text)."""
        return dict(self._text_changes)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "positions": dict(self._positions),
            "delivered": dict(self._delivered),
            "ended": sorted(self._ended),
            "next_worker": self._next_worker,
            "slots": self.slots,
            "stream": self._stream(),
            "rejections": dict(self._rejections),
            "text_changes": dict(self._text_changes),
        }

    def _stream(self) -> dict[str, Any]:
        """What decides each worker's stream, besides the layout: the saved positions count samples
        of this stream only (another seed or shard list silently replayed other samples)."""
        return {
            "seed": self.config.seed,
            "datasets": [
                [ds.spec.name, ds.spec.weight, [os.path.basename(p) for p in ds.paths]]
                for ds in self.datasets
            ],
            "shuffle_shards": self.config.shuffle_shards,
            "shuffle_buffer": self.config.shuffle_buffer,
            "resample": self.config.resample,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["slots"] != self.slots:
            raise InputError(
                f"loader state was saved with {state['slots']} worker slots (world size x workers); "
                f"this loader has {self.slots}: resume with the same world size and num_workers"
            )
        saved = state.get("stream")  # a state saved without its stream is not checked
        if saved is not None and saved != self._stream():
            now = self._stream()
            changed = ", ".join(
                f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now"
                for k in sorted({*saved, *now})
                if saved.get(k) != now.get(k)
            )
            raise InputError(
                f"loader state was saved for another stream ({changed}): its positions would"
                " replay other samples; resume with the same datasets, shards, seed and shuffling"
            )
        self.epoch = int(state["epoch"])
        self._positions = {int(k): int(v) for k, v in state["positions"].items()}
        delivered = state.get("delivered", state["positions"])  # older states: samples read
        self._delivered = {int(k): int(v) for k, v in delivered.items()}
        self._ended = {int(slot) for slot in state.get("ended", [])}
        self._next_worker = int(state.get("next_worker", 0))
        self._rejections = Counter(state.get("rejections", {}))
        self._text_changes = Counter(state.get("text_changes", {}))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        limit = self._slot_limit() if self.config.resample else None
        stream = _WorkerStream(
            self.datasets,
            self.tokenizer,
            self.config,
            self.epoch,
            self.rank,
            self.world_size,
            _Resume(
                dict(self._positions),
                dict(self._delivered),
                frozenset(self._ended),
                self._next_worker,
            ),
            limit,
        )
        workers = max(1, self.config.num_workers)
        for batch in self._source(stream):
            slot = batch.pop("_slot")
            self._positions[slot] = batch.pop("_position")
            self._next_worker = (slot - self.rank * workers + 1) % workers
            self._rejections.update(batch.pop("_rejections"))
            self._text_changes["special_token_text"] += batch.pop("_special_token_text", 0)
            self._maybe_log()
            if batch.pop("_last", False) or batch.get("_end", False):
                self._ended.add(slot)
            if not batch.pop("_end", False):
                self._delivered[slot] = self._delivered.get(slot, 0) + len(batch["keys"])
                yield _finish_batch(batch, self.config)

    def _source(self, stream: _WorkerStream) -> Iterator[dict[str, Any]]:
        if self.config.num_workers == 0:
            return iter(stream)
        return iter(
            DataLoader(
                stream,
                batch_size=None,
                num_workers=self.config.num_workers,
                prefetch_factor=self.config.prefetch_factor,
                persistent_workers=False,
            )
        )

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if self._rejections and now - self._last_log > LOG_EVERY_S:
            self._last_log = now
            log.warning("loader rejections so far: %s", dict(self._rejections.most_common()))


def build_loader(
    specs: list[DatasetSpec], tokenizer, config: LoaderConfig, rank: int = 0, world_size: int = 1
) -> FlamingoLoader:
    """Batches of Flamingo training samples from the given datasets, for this rank."""
    return FlamingoLoader(specs, tokenizer, config, rank, world_size)


__all__ = ["FlamingoLoader", "build_loader", "ReadIssue"]
