"""Our MMC4 converter vs what open_flamingo's convert_mmc4_to_wds.py does, in one run, on the same input.

Baseline: one process, every image decoded with PIL and re-encoded as JPEG, random uuid keys, written with
webdataset's ShardWriter. Ours: default settings (bytes kept) and ``--short-side 256`` (quality 70 by
default there), beside other qualities, tables and encoders.
Usage: python benchmarks/bench_convert_mmc4.py [--docs-per-shard 150] [--shards 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import sys
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
                    except FileNotFoundError:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--docs-per-shard", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours per row (median)")
    parser.add_argument(
        "--scratch",
        default=None,
        help="folder for input and outputs (default: the system temp folder)",
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-mmc4-", dir=args.scratch))
    try:
        docs, images = write_photo_mmc4(root / "src", args.shards, args.docs_per_shard)
        print(
            f"input: {args.shards} zips x {args.docs_per_shard} docs of web-size photos; {default_processes()} cores"
        )
        base_rate, base_size = timed(
            "baseline (decode+re-encode, 1 proc)",
            lambda o: baseline(docs, images, o),
            root / "baseline",
        )
        ours_timed = partial(timed, repeats=args.repeats)
        keep_rate, _ = ours_timed(
            "flamingo-data (bytes kept)",
            lambda o: ours(docs, images, o, ImagePolicy()),
            root / "keep",
        )
        nosync_rate, _ = ours_timed(
            "flamingo-data (bytes kept) --no-fsync",
            lambda o: ours(docs, images, o, ImagePolicy(), fsync=False),
            root / "keep-nosync",
        )
        resized = {}
        for label, policy in (
            ("--short-side 256", ImagePolicy(short_side=256)),
            (
                "--short-side 256 --resize-filter bilinear",
                ImagePolicy(short_side=256, resize_filter="bilinear"),
            ),
            ("--short-side 256 -q 90", ImagePolicy(short_side=256, quality=90)),
            (
                "--short-side 256 -q 90 --jpeg-tables annex-k",
                ImagePolicy(short_side=256, quality=90, jpeg_tables="annex-k"),
            ),
            (
                "--short-side 256 -q 75 --jpeg-tables annex-k",
                ImagePolicy(short_side=256, quality=75, jpeg_tables="annex-k"),
            ),
            *jpegli_rows(),
        ):
            resized[label] = ours_timed(
                f"flamingo-data {label}",
                lambda o, policy=policy: ours(docs, images, o, policy),
                root / label.replace(" ", "_").replace("-", ""),
            )
        print(
            f"\nspeed, bytes kept:      {keep_rate / base_rate:5.1f}x the baseline's docs/s (target >= 20x)"
        )
        print(
            f"speed, bytes kept, --no-fsync: {nosync_rate / base_rate:5.1f}x (the baseline never syncs)"
        )
        for label, (rate, size) in resized.items():
            print(
                f"{label:<48} {rate / base_rate:4.1f}x docs/s (target >= 3x), "
                f"{size / base_size:5.3f} of the baseline's bytes (target <= 0.25)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
