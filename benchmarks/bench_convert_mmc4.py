"""Our MMC4 converter vs what open_flamingo's convert_mmc4_to_wds.py does, in one run, on the same input.

Baseline: one process, every image decoded with PIL and re-encoded as JPEG, random uuid keys, written with
webdataset's ShardWriter. Ours: default settings (bytes kept) and ``--short-side 256`` (quality 70 by
default there), beside other qualities, tables and encoders.
Input: web-like images (benchmarks/weblike.py; ``--input photos`` for the clean-photo set). Also: the
bytes-kept run's wall time against ``dd conv=fsync`` writing the same byte count in the same run.
Usage: python benchmarks/bench_convert_mmc4.py [--docs-per-shard 150] [--shards 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from functools import partial
from pathlib import Path

import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import write_photo_mmc4  # noqa: E402
from weblike import write_web_mmc4  # noqa: E402

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4  # noqa: E402
from flamingo_data.images.stage import ImagePolicy  # noqa: E402
from flamingo_data.run.executors import (
    Execution,
    default_processes,  # noqa: E402
)
from flamingo_data.run.units import RunOptions  # noqa: E402
from flamingo_data.storage.specs import expand_specs  # noqa: E402


def baseline(docs: str, images: str, out: Path) -> int:
    """The published converter's approach, re-stated: decode + re-encode every image, uuid keys."""
    out.mkdir(parents=True)
    written = 0
    with wds.ShardWriter(str(out / "%09d.tar"), maxcount=10000) as sink:
        for index, path in enumerate(expand_specs(docs, keep_missing=False)):
            with zipfile.ZipFile(path) as zf:
                lines = zf.read(zf.namelist()[0]).decode().splitlines()
            for line in lines:
                doc = json.loads(line)
                for info in doc["image_info"]:
                    try:
                        image = Image.open(Path(images) / str(index) / info["image_name"]).convert(
                            "RGB"
                        )
                    except (OSError, ValueError):  # missing or broken: the image is left out
                        continue
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG")
                    info["image_base64"] = base64.b64encode(buf.getvalue()).decode()
                sink.write({"__key__": uuid.uuid4().hex, "json": doc})
                written += 1
    return written


def ours(docs: str, images: str, out: Path, policy: ImagePolicy, fsync: bool = True) -> int:
    stats = convert_mmc4(
        docs,
        Mmc4Options(images=images, policy=policy),
        RunOptions(out_dir=str(out), converter="mmc4", fsync=fsync),
        execution=Execution(processes=default_processes(), progress=False),
    )
    return stats.get("documents", "written")


def jpegli_rows() -> list[tuple[str, ImagePolicy]]:
    """The optional jpegli encoder's rows, when its extra is installed."""
    try:
        ImagePolicy(encoder="jpegli")
    except ValueError:
        print("(jpegli rows skipped: pip install 'flamingo-data[jpegli]')")
        return []
    return [
        ("--short-side 256 --encoder jpegli", ImagePolicy(short_side=256, encoder="jpegli")),
        (
            "--short-side 256 -q 90 --encoder jpegli",
            ImagePolicy(short_side=256, quality=90, encoder="jpegli"),
        ),
    ]


def timed(label: str, fn, out: Path, repeats: int = 1) -> tuple[float, int]:
    """Median docs/s of ``repeats`` runs, each from a flushed page cache (ext4 makes our fsync pay
    for whatever an earlier run left dirty). Sub-second runs vary; the median steadies them."""
    rates = []
    for attempt in range(repeats):
        target = out if attempt == 0 else out.with_name(f"{out.name}-{attempt}")
        os.sync()
        start = time.perf_counter()
        n = fn(target)
        rates.append(n / (time.perf_counter() - start))
        if attempt:
            shutil.rmtree(target)
    rate = statistics.median(rates)
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    runs = f"median of {repeats}" if repeats > 1 else "1 run"
    print(
        f"{label:<40} {n:5d} docs  {n / rate:6.2f} s  {rate:7.1f} docs/s  {size / 1e6:6.1f} MB  ({runs})"
    )
    return rate, size


def dd_seconds(folder: Path, n_bytes: int) -> float:
    """Wall time of ``dd conv=fsync`` writing ``n_bytes`` into ``folder``: the disk's own limit."""
    target = folder / "dd.bin"
    os.sync()
    start = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={target}",
            "bs=1M",
            f"count={max(1, n_bytes >> 20)}",
            "conv=fsync",
        ],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def resized_rows(quick: bool) -> list[tuple[str, ImagePolicy]]:
    rows = [("--short-side 256", ImagePolicy(short_side=256))]
    if quick:
        return rows
    return [
        *rows,
        (
            "--short-side 256 --resize-filter bilinear",
            ImagePolicy(short_side=256, resize_filter="bilinear"),
        ),
        ("--short-side 256 -q 90", ImagePolicy(short_side=256, quality=90)),
        (
            "--short-side 256 -q 90 --jpeg-tables annex-k",
            ImagePolicy(short_side=256, quality=90, jpeg_tables="annex-k"),
        ),
        *jpegli_rows(),
    ]


def write_input(kind: str, root: Path, shards: int, docs_per_shard: int) -> tuple[str, str]:
    if kind == "photos":
        docs, images = write_photo_mmc4(root, shards, docs_per_shard)
        print(f"input: {shards} zips x {docs_per_shard} docs of clean web-size photos")
        return docs, images
    docs, images, made = write_web_mmc4(root, shards, docs_per_shard)
    mix = ", ".join(f"{kind} {n}" for kind, n in made.most_common())
    print(f"input: {shards} zips x {docs_per_shard} docs, web-like images ({mix})")
    return docs, images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--docs-per-shard", type=int, default=150)
    parser.add_argument("--input", choices=("web", "photos"), default="web")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours per row (median)")
    parser.add_argument("--quick", action="store_true", help="only the two rows the goals name")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--scratch",
        default=None,
        help="folder for input and outputs (default: the system temp folder)",
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-mmc4-", dir=args.scratch))
    try:
        docs, images = write_input(args.input, root / "src", args.shards, args.docs_per_shard)
        print(f"{default_processes()} processes")
        base_rate, base_size = timed(
            "baseline (decode+re-encode, 1 proc)",
            lambda o: baseline(docs, images, o),
            root / "baseline",
        )
        ours_timed = partial(timed, repeats=args.repeats)
        keep_rate, keep_size = ours_timed(
            "flamingo-data (bytes kept)",
            lambda o: ours(docs, images, o, ImagePolicy()),
            root / "keep",
        )
        keep_docs = len(read_keys(root / "keep"))
        dd = dd_seconds(root, keep_size)
        results = {
            "input": args.input,
            "baseline_docs_per_s": base_rate,
            "keep": {
                "speedup": keep_rate / base_rate,
                "seconds": keep_docs / keep_rate,
                "dd_fsync_seconds": dd,
                "vs_dd": keep_docs / keep_rate / dd,
                "bytes": keep_size,
            },
            "resized": {},
        }
        print(f"dd conv=fsync, the same {keep_size / 1e6:.0f} MB: {dd:.2f} s")
        for label, policy in resized_rows(args.quick):
            rate, size = ours_timed(
                f"flamingo-data {label}",
                lambda o, policy=policy: ours(docs, images, o, policy),
                root / label.replace(" ", "_").replace("-", ""),
            )
            results["resized"][label] = {
                "speedup": rate / base_rate,
                "bytes_ratio": size / base_size,
            }
        report(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_keys(out: Path) -> list[str]:
    keys = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name for m in tar]
    return keys


def report(results: dict) -> None:
    keep = results["keep"]
    print(f"\nbytes kept: {keep['speedup']:5.1f}x the baseline's docs/s")
    print(
        f"bytes kept: wall {keep['seconds']:.2f} s = {keep['vs_dd']:.2f}x dd conv=fsync of the "
        "same bytes (goal <= 1.5x)"
    )
    for label, row in results["resized"].items():
        print(
            f"{label:<48} {row['speedup']:4.1f}x docs/s (goal >= 3.5x), "
            f"{row['bytes_ratio']:5.3f} of the baseline's bytes (goal <= 0.25)"
        )


if __name__ == "__main__":
    main()
