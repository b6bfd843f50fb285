"""The loader over real tars: splitting, determinism, mixing, resume, and corrupt input."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from flamingo_data.core.records import encode_base64
from flamingo_data.errors import EmptyDataset
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
from flamingo_data.loader.imageproc import normalize_vision
from tests.loader_data import interleaved_record, simple_docs, solid_jpeg, write_json_shard

CONFIG = LoaderConfig(batch_size=3, image_size=32, shuffle_buffer=8, seed=7)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    docs = simple_docs(24)
    keys = sorted(docs)
    for part in range(4):
        write_json_shard(
            tmp_path, f"part{part}", {k: docs[k] for k in keys[part * 6 : (part + 1) * 6]}
        )
    return tmp_path


def epoch_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


def config(**changes) -> LoaderConfig:
    return LoaderConfig(**{**CONFIG.__dict__, **changes})


def test_every_sample_once_per_epoch_with_workers(shards: Path) -> None:
    for workers in (0, 2):
        loader = build_loader(
            [DatasetSpec("mmc4", str(shards))], make_tokenizer(None), config(num_workers=workers)
        )
        keys = epoch_keys(loader)
        assert sorted(keys) == sorted(simple_docs(24)) and loader.samples_per_epoch == 24


def test_split_by_node_is_a_partition(shards: Path) -> None:
    tokenizer = make_tokenizer(None)
    per_rank = [
        epoch_keys(build_loader([DatasetSpec("d", str(shards))], tokenizer, config(), rank, 2))
        for rank in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(simple_docs(24))


def test_a_named_shard_that_does_not_exist_is_reported_not_silently_skipped(
    shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = str(shards / "part{0..4}-00000.tar")  # part4 was never written
    with caplog.at_level("WARNING", logger="flamingo_data.loader"):
        loader = build_loader([DatasetSpec("mmc4", spec)], make_tokenizer(None), config())
    assert loader.missing_shards() == {"mmc4": [str(shards / "part4-00000.tar")]}
    assert "1 of 5 named shards do not exist" in caplog.text
    assert sorted(epoch_keys(loader)) == sorted(simple_docs(24))


def test_fewer_shards_than_workers_still_covers_each_sample_once(tmp_path: Path) -> None:
    write_json_shard(tmp_path, "only", simple_docs(7))
    keys = epoch_keys(
        build_loader([DatasetSpec("d", str(tmp_path))], make_tokenizer(None), config(num_workers=2))
    )
    assert sorted(keys) == sorted(simple_docs(7))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_shard_is_one_rejection_however_many_workers_read_it(
    tmp_path: Path, workers: int
) -> None:
    """With fewer shards than workers every worker reads every shard; the shard's read issue
    (here a truncated tar) must still be counted once, and each intact sample delivered once."""
    docs = simple_docs(5)
    cut = write_json_shard(tmp_path, "cut", docs)
    with tarfile.open(cut) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(cut.read_bytes()[: last.offset_data + last.size // 2])  # inside the last member
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))], make_tokenizer(None), config(num_workers=workers)
    )
    assert sorted(epoch_keys(loader)) == sorted(docs)[:4]
    assert loader.rejections() == {"truncated_tar": 1}


def test_same_seed_same_batches_and_worker_count_does_not_change_samples(shards: Path) -> None:
    tokenizer = make_tokenizer(None)
    spec = [DatasetSpec("d", str(shards))]
    run_a = list(build_loader(spec, tokenizer, config(flip_prob=0.5)))
    run_b = list(build_loader(spec, tokenizer, config(flip_prob=0.5)))
    assert [b["keys"] for b in run_a] == [b["keys"] for b in run_b]
    assert all(torch.equal(a["vision_x"], b["vision_x"]) for a, b in zip(run_a, run_b, strict=True))
    by_key = lambda batches: {k: b["vision_x"][i] for b in batches for i, k in enumerate(b["keys"])}  # noqa: E731
    two_workers = by_key(build_loader(spec, tokenizer, config(flip_prob=0.5, num_workers=2)))
    one_worker = by_key(run_a)
    assert two_workers.keys() == one_worker.keys()
    assert all(torch.equal(two_workers[k], one_worker[k]) for k in one_worker)


def test_other_epoch_other_order(shards: Path) -> None:
    loader = build_loader([DatasetSpec("d", str(shards))], make_tokenizer(None), config())
    first = epoch_keys(loader)
    loader.set_epoch(1)
    second = epoch_keys(loader)
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_unseen_samples(shards: Path, workers: int) -> None:
    spec, tokenizer = [DatasetSpec("d", str(shards))], make_tokenizer(None)
    full = epoch_keys(build_loader(spec, tokenizer, config(num_workers=workers)))
    first = build_loader(spec, tokenizer, config(num_workers=workers))
    iterator, seen = iter(first), []
    for _ in range(3):
        seen += next(iterator)["keys"]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    del iterator
    resumed = build_loader(spec, tokenizer, config(num_workers=workers))
    resumed.load_state_dict(state)
    rest = epoch_keys(resumed)
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(full)


def test_resume_refuses_a_different_worker_layout(shards: Path) -> None:
    loader = build_loader(
        [DatasetSpec("d", str(shards))], make_tokenizer(None), config(num_workers=2)
    )
    other = build_loader([DatasetSpec("d", str(shards))], make_tokenizer(None), config())
    with pytest.raises(ValueError, match="worker slots"):
        other.load_state_dict(loader.state_dict())


def test_weighted_mix_sees_every_sample_of_both_datasets(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_json_shard(tmp_path / "a", "a", simple_docs(10, seed=1))
    write_json_shard(tmp_path / "b", "b", simple_docs(30, seed=2))
    specs = [
        DatasetSpec("a", str(tmp_path / "a"), weight=1.0),
        DatasetSpec("b", str(tmp_path / "b"), weight=3.0),
    ]
    batches = list(build_loader(specs, make_tokenizer(None), config()))
    names = [(k, d) for b in batches for k, d in zip(b["keys"], b["dataset"], strict=True)]
    assert sorted(k for k, d in names if d == "a") == sorted(simple_docs(10, seed=1))
    assert sorted(k for k, d in names if d == "b") == sorted(simple_docs(30, seed=2))


def test_resampling_draws_samples_per_epoch(shards: Path) -> None:
    loader = build_loader(
        [DatasetSpec("d", str(shards))],
        make_tokenizer(None),
        config(resample=True, samples_per_epoch=30),
    )
    assert len(epoch_keys(loader)) == 30


class _Boom:
    """Unpickling this would create a file: the loader must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_counted_and_nothing_is_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = interleaved_record(["A"], [[0.5]], [solid_jpeg((10, 200, 10))])
    bad_b64 = interleaved_record(["A"], [[0.5]], [solid_jpeg((10, 200, 10))])
    bad_b64["image_info"][0]["image_base64"] = "%%%%"
    bomb = interleaved_record(["A"], [[0.5]], [None])
    bomb_png = _bomb_png()
    bomb["image_info"][0]["image_base64"] = encode_base64(bomb_png)
    shard = tmp_path / "data" / "bad.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _add(tar, "good.json", json.dumps(good).encode())
        _add(tar, "badjson.json", b"{not json")
        _add(tar, "nan.json", json.dumps(good).replace("0.5", "NaN").encode())
        _add(tar, "surrogate.json", json.dumps(good).replace('"A"', '"\\udc00"').encode())
        _add(tar, "badb64.json", json.dumps(bad_b64).encode())
        _add(tar, "bomb.json", json.dumps(bomb).encode())
        _add(tar, "evil.pickle", pickle.dumps(_Boom(str(marker))))
        _add(tar, "../escape.json", json.dumps(good).encode())
    truncated = tmp_path / "data" / "truncated.tar"
    truncated.write_bytes(shard.read_bytes()[:700])
    (tmp_path / "data" / "empty.tar").write_bytes(b"")
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path / "data"))],
        make_tokenizer(None),
        config(num_workers=0, shuffle_shards=False),
    )
    keys = epoch_keys(loader)
    assert keys == ["good"]
    reasons = loader.rejections()
    assert (
        reasons["bad_json"] == 3
        and reasons["bad_base64"] == 1
        and reasons["unexpected_member"] == 1
    )
    assert (
        reasons["unsafe_member_name"] == 1
        and reasons["truncated_tar"] == 1
        and reasons["empty_tar"] == 1
    )
    assert reasons["undecodable_image"] == 1  # the bomb: refused by the pixel cap before decoding
    assert not marker.exists()


def _bomb_png() -> bytes:
    """A valid PNG header declaring 40000 x 40000 pixels (tiny file, 1.6 G pixels if decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_image_padding_slots_are_zero_in_and_out_of_workers(tmp_path: Path, workers: int) -> None:
    """One-image and two-image documents in one batch: the second slot of a one-image document is
    all zeros (the batch buffer is uninitialised memory, shared memory in workers)."""
    white = solid_jpeg((255, 255, 255))
    docs = {
        f"d{i}": interleaved_record(
            ["A.", "B."], [[0.3, 0.1], [0.1, 0.3]][: 1 + i % 2], [white] * (1 + i % 2)
        )
        for i in range(8)
    }
    write_json_shard(tmp_path, "mix", docs)
    cfg = config(batch_size=4, num_workers=workers, shuffle_buffer=1, max_images=2)
    batches = list(build_loader([DatasetSpec("d", str(tmp_path))], make_tokenizer(None), cfg))
    seen = 0
    for batch in batches:
        assert batch["vision_x"].shape[1] == 2
        for row, key in enumerate(batch["keys"]):
            images = 1 + int(key[1:]) % 2
            assert bool((batch["vision_x"][row, :images] != 0).all())
            assert not bool(batch["vision_x"][row, images:].any())
            seen += 1
    assert seen == 8


def test_workers_send_uint8_pixels_without_padding_and_batches_get_float_vision_x() -> None:
    """What crosses the process boundary is the compact uint8 form (10x fewer bytes than the
    padded float32 vision_x); the loader turns it into the model's tensor on arrival."""
    from flamingo_data.loader.pipeline import _collate, _finish_batch

    cfg = config()
    samples = [
        {
            "pixels": torch.full((n, 3, 4, 4), 255, dtype=torch.uint8),
            "input_ids": torch.tensor([1, 2]),
            "attention_mask": torch.tensor([1, 1]),
            "labels": torch.tensor([-100, 2]),
            "pad_images": 3,
            "key": f"k{n}",
            "dataset": "d",
        }
        for n in (1, 2)
    ]
    sent = _collate(samples, 0, slot=0, position=2, rejections=Counter())
    assert sent["_pixels"].dtype == torch.uint8 and sent["_pixels"].shape == (3, 3, 4, 4)
    assert sent["_image_counts"] == [1, 2] and "vision_x" not in sent
    batch = _finish_batch(sent, cfg)
    white = (1.0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert (
        batch["vision_x"].shape == (2, 3, 1, 3, 4, 4) and batch["vision_x"].dtype == torch.float32
    )
    assert torch.allclose(batch["vision_x"][1, :2, 0, :, 0, 0], white.expand(2, 3), atol=1e-5)
    assert not batch["vision_x"][0, 1:].any()


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_pixels_normalized_on_the_device_equal_the_float_batches_bit_for_bit(
    tmp_path: Path, workers: int
) -> None:
    """``pixels="uint8"`` delivers the pixels as they are (a quarter of the bytes) and
    ``normalize_vision`` gives exactly the float vision_x, padding slots zero; everything else in
    the batch is the same."""
    images = [solid_jpeg((255, 0, 0)), solid_jpeg((10, 200, 30)), solid_jpeg((0, 0, 0))]
    docs = {
        f"d{i}": interleaved_record(
            ["A.", "B.", "C."],
            [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1], [0.1, 0.1, 0.3]][: 1 + i % 3],
            images[: 1 + i % 3],
        )
        for i in range(9)
    }
    write_json_shard(tmp_path, "mix", docs)
    spec = [DatasetSpec("d", str(tmp_path))]
    cfg = config(batch_size=4, num_workers=workers, max_images=3)
    floats = list(build_loader(spec, make_tokenizer(None), cfg))
    raw = list(
        build_loader(spec, make_tokenizer(None), config(**{**cfg.__dict__, "pixels": "uint8"}))
    )
    assert len(raw) == len(floats) == 3
    for plain, compact in zip(floats, raw, strict=True):
        assert compact["vision_x"].dtype == torch.uint8
        assert compact["vision_x"].shape == plain["vision_x"].shape
        counts = [1 + int(key[1:]) % 3 for key in compact["keys"]]
        assert compact.pop("image_counts").tolist() == counts
        normalized = normalize_vision(compact["vision_x"], torch.tensor(counts), cfg.mean, cfg.std)
        assert torch.equal(normalized, plain["vision_x"])
        assert normalized.dtype == torch.float32 and bool((normalized[:, 0] != 0).any())
        for name in ("lang_x", "attention_mask", "labels"):
            assert torch.equal(compact[name], plain[name])
    with pytest.raises(ValueError, match="`pixels` must be float or uint8"):
        config(pixels="fp16")


def test_samples_whose_literal_special_tokens_were_broken_are_counted(tmp_path: Path) -> None:
    docs = simple_docs(4)
    docs["doc0_0001"]["text_list"][1] = "An <img> is <image> in HTML."
    write_json_shard(tmp_path, "part", docs)
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))], make_tokenizer(None), config(num_workers=0)
    )
    assert len(epoch_keys(loader)) == 4 and not loader.rejections()
    assert loader.text_changes() == {"special_token_text": 1}
    assert loader.state_dict()["text_changes"] == {"special_token_text": 1}


def _batches_and_rejections(loader) -> tuple[list[list[str]], dict[str, int]]:
    return [batch["keys"] for batch in loader], loader.rejections()


def test_resume_with_workers_continues_in_the_same_order_and_counts_each_issue_once(
    tmp_path: Path,
) -> None:
    """Stopped after any batch and resumed, the run delivers exactly the batches an uninterrupted
    run delivers next, in the same order, and its rejections equal the uninterrupted run's (read
    issues met while replaying up to the saved position, or in a finished worker, are not counted
    twice). Worker 0 reads 3 documents then an empty tar and finishes first; worker 1 reads a tar
    cut inside its last member (4 of 5 documents) then 4 documents."""
    write_json_shard(tmp_path, "a_ok", simple_docs(3, seed=1))
    cut = write_json_shard(tmp_path, "b_cut", simple_docs(5, seed=2))
    with tarfile.open(cut) as tar:
        last = tar.getmembers()[-1]
    cut.write_bytes(cut.read_bytes()[: last.offset_data + last.size // 2])
    (tmp_path / "c_empty-00000.tar").write_bytes(b"")
    write_json_shard(tmp_path, "d_ok", simple_docs(4, seed=3))
    spec, tokenizer = [DatasetSpec("d", str(tmp_path))], make_tokenizer(None)
    cfg = config(batch_size=2, num_workers=2, shuffle_shards=False, shuffle_buffer=1)
    full, full_rejections = _batches_and_rejections(build_loader(spec, tokenizer, cfg))
    assert len(full) == 6 and full_rejections == {"empty_tar": 1, "truncated_tar": 1}
    for stop in range(1, len(full)):
        first = build_loader(spec, tokenizer, cfg)
        iterator = iter(first)
        seen = [next(iterator)["keys"] for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        del iterator
        resumed = build_loader(spec, tokenizer, cfg)
        resumed.load_state_dict(state)
        rest, rejections = _batches_and_rejections(resumed)
        assert seen + rest == full, f"stopped after {stop} batches"
        assert rejections == full_rejections, f"stopped after {stop} batches"


@pytest.mark.timeout(60)
def test_resampling_a_dataset_with_no_readable_sample_ends_instead_of_looping(
    tmp_path: Path,
) -> None:
    """Drawing shards with replacement from shards that never yield a sample used to loop forever
    (the worker never produced a batch). Now the stream ends, the shard's problem is counted, and
    in a mix the other dataset fills the epoch."""
    (tmp_path / "e").mkdir(), (tmp_path / "g").mkdir()
    (tmp_path / "e" / "empty-00000.tar").write_bytes(b"")
    write_json_shard(tmp_path / "g", "g", simple_docs(4))
    empty_only = build_loader(
        [DatasetSpec("e", str(tmp_path / "e"))],
        make_tokenizer(None),
        config(resample=True, samples_per_epoch=10),
    )
    assert epoch_keys(empty_only) == [] and empty_only.rejections() == {"empty_tar": 1}
    mix = build_loader(
        [DatasetSpec("e", str(tmp_path / "e")), DatasetSpec("g", str(tmp_path / "g"))],
        make_tokenizer(None),
        config(resample=True, samples_per_epoch=12),
    )
    keys = epoch_keys(mix)
    assert len(keys) == 12 and set(keys) <= set(simple_docs(4))


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_mixing_weight_that_is_not_a_positive_number_is_refused_up_front(
    tmp_path: Path, weight: float
) -> None:
    """Such weights made the mix's probabilities NaN ('Probabilities contain NaN' in a worker, mid
    epoch), or a 0-weight dataset was drawn anyway once the others were exhausted."""
    with pytest.raises(ValueError, match="weight must be a finite number above 0"):
        DatasetSpec("a", str(tmp_path), weight=weight)


@pytest.mark.parametrize("content", ["[6]", '"6"', '{"N": -6}', '{"N": "six"}', '{"N": 1.5}', "{"])
def test_a_malformed_sizes_json_leaves_the_epoch_length_unknown_and_says_so(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A list crashed build_loader ('list' object has no attribute 'get'), 'six' raised int()'s
    ValueError, -6 gave a negative epoch length (so a resampled epoch was empty) and 1.5 became 1.
    Now the count is unknown, a warning names the file, and every sample is still read."""
    shard = write_json_shard(tmp_path, "part", simple_docs(6))
    (tmp_path / "sizes.json").write_text(content.replace("N", shard.name))
    loader = build_loader([DatasetSpec("d", str(tmp_path))], make_tokenizer(None), config())
    assert loader.samples_per_epoch is None and loader.batches_per_epoch() is None
    assert "sizes.json" in caplog.text or shard.name in caplog.text
    assert sorted(epoch_keys(loader)) == sorted(simple_docs(6))


def test_resampled_epochs_give_every_rank_the_same_number_of_batches(tmp_path: Path) -> None:
    """With resampling, samples_per_epoch counts delivered samples: each worker delivers its share
    whatever it rejects, so ranks step together (unequal batch counts hang DDP/FSDP collectives).
    A third of the documents are rejected; each slot used to stop after a fixed number of samples
    *read*, and 2 ranks got 5 and 6 batches (19 and 23 samples, not 40 each)."""
    for part in range(4):
        docs = simple_docs(10, seed=part)
        for i, key in enumerate(sorted(docs)):
            if (i * 7 + part) % 3 == 0:
                docs[key]["similarity_matrix"] = [[0.0, 0.0]]  # no image placed: no_images
        write_json_shard(tmp_path, f"p{part}", docs)
    cfg = config(batch_size=4, resample=True, samples_per_epoch=80)
    for world in (2, 4):
        loaders = [
            build_loader([DatasetSpec("d", str(tmp_path))], make_tokenizer(None), cfg, rank, world)
            for rank in range(world)
        ]
        per_rank = [[len(batch["keys"]) for batch in loader] for loader in loaders]
        assert [sum(sizes) for sizes in per_rank] == [80 // world] * world
        assert [len(sizes) for sizes in per_rank] == [loaders[0].batches_per_epoch()] * world
        assert all(loader.rejections()["no_images"] > 0 for loader in loaders)


@pytest.mark.timeout(60)
def test_resampling_shards_whose_every_sample_is_rejected_stops_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resampling limit counts delivered samples, so a dataset with no usable sample would be
    read forever: after MAX_REFUSED_IN_A_ROW rejections in a row the worker says why."""
    from flamingo_data.loader import pipeline

    monkeypatch.setattr(pipeline, "MAX_REFUSED_IN_A_ROW", 50)
    docs = simple_docs(4)
    for doc in docs.values():
        doc["similarity_matrix"] = [[0.0, 0.0]]
    write_json_shard(tmp_path, "bad", docs)
    loader = build_loader(
        [DatasetSpec("d", str(tmp_path))],
        make_tokenizer(None),
        config(resample=True, samples_per_epoch=8),
    )
    with pytest.raises(EmptyDataset, match=r"50 samples in a row rejected.*no_images"):
        epoch_keys(loader)


LOADER_PEAK_RSS = """
import resource, sys
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
config = LoaderConfig(batch_size=1, image_size=32, num_workers=0, seed=7)
loader = build_loader([DatasetSpec("d", sys.argv[1])], make_tokenizer(None), config)
keys = [key for batch in loader for key in batch["keys"]]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak, keys, sorted(loader.rejections().items()))
"""


def _loader_peak_kib(folder: Path) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", LOADER_PEAK_RSS, str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    peak, rest = out.split(" ", 1)
    return int(peak), rest.strip()


def _with_sparse_member(folder: Path, size: int) -> Path:
    """A shard of one good record followed by a ``size``-byte ``k.mp4`` of zeros (sparse on disk)."""
    doc = interleaved_record(["A"], [[0.5]], [solid_jpeg((10, 200, 10))])
    folder.mkdir()
    shard = write_json_shard(folder, "part", {"k": doc})
    with open(shard, "r+b") as handle:
        handle.seek(-2 * tarfile.BLOCKSIZE, io.SEEK_END)
        while handle.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE:
            handle.seek(-2 * tarfile.BLOCKSIZE, io.SEEK_CUR)  # back to the last member's end
        info = tarfile.TarInfo("k.mp4")
        info.size = size
        handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
        handle.truncate(handle.tell() + size + 2 * tarfile.BLOCKSIZE)  # size: a block multiple
    return folder


def test_a_huge_member_the_loader_never_decodes_costs_no_memory(tmp_path: Path) -> None:
    """Each worker read a member it only counts as unexpected whole (+256 MB for 256 MiB)."""
    small = _with_sparse_member(tmp_path / "small", 1024)
    big = _with_sparse_member(tmp_path / "big", 256 << 20)
    (small_peak, small_out), (big_peak, big_out) = map(_loader_peak_kib, (small, big))
    assert small_out == big_out == "['k'] [('unexpected_member', 1)]"
    assert big_peak - small_peak < 64 << 10, (small_peak, big_peak)


def test_resume_refuses_a_state_of_another_stream(shards: Path) -> None:
    """Positions count samples of one stream: restored onto another seed (the trainer seeds each
    dataset's loader by its place in the command line), other weights or another shard list,
    the resumed epoch silently repeated some samples and skipped others."""
    spec, tokenizer = [DatasetSpec("d", str(shards))], make_tokenizer(None)
    first = build_loader(spec, tokenizer, config())
    iterator = iter(first)
    seen = next(iterator)["keys"] + next(iterator)["keys"]
    state = json.loads(json.dumps(first.state_dict()))
    del iterator
    fewer_shards = [DatasetSpec("d", [str(p) for p in sorted(shards.glob("*.tar"))[:3]])]
    for specs, cfg, message in (
        (spec, config(seed=8), "seed: 7 then, 8 now"),
        ([DatasetSpec("d", str(shards), weight=2.0)], config(), "datasets:"),
        (fewer_shards, config(), "datasets:"),
        (spec, config(shuffle_buffer=4), "shuffle_buffer: 8 then, 4 now"),
    ):
        other = build_loader(specs, tokenizer, cfg)
        with pytest.raises(ValueError, match=f"another stream.*{message}"):
            other.load_state_dict(state)
    same = build_loader(spec, tokenizer, config())
    same.load_state_dict(state)
    assert sorted(seen + epoch_keys(same)) == sorted(simple_docs(24))
    older = build_loader(spec, tokenizer, config())
    older.load_state_dict({k: v for k, v in state.items() if k != "stream"})  # not checked
    assert sorted(seen + epoch_keys(older)) == sorted(simple_docs(24))
