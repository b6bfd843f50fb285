"""``validate`` against naive Python loops doing less, on the same bytes-kept shards of web-like data.

Baselines (one process): a loop that only reads each member, ``json.loads`` it and base64-decodes its
images (what any check must at least do); for ``--deep``, the same loop fully decoding every image
with PIL. Ours: ``validate_shards`` in this process with 1 and 2 processes, default and ``deep``.
Usage: python benchmarks/bench_validate.py [--shards 4] [--docs-per-shard 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weblike import write_web_mmc4  # noqa: E402

from flamingo_data.check.validate import validate_shards  # noqa: E402
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4  # noqa: E402
from flamingo_data.run.executors import Execution  # noqa: E402
from flamingo_data.run.units import RunOptions  # noqa: E402


def naive_loop(shards: list[Path], decode: bool) -> int:
    """Read every member, json.loads it, base64-decode (and with ``decode`` PIL-decode) its images."""
    images = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                record = json.loads(tar.extractfile(member).read())
                for info in record.get("image_info", []):
                    data = base64.b64decode(info["image_base64"]) if "image_base64" in info else b""
                    if data and decode:
                        Image.open(io.BytesIO(data)).convert("RGB")
                    images += bool(data)
    return images


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--docs-per-shard", type=int, default=150)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    try:
        docs, images, _ = write_web_mmc4(root / "src", args.shards, args.docs_per_shard)
        convert_mmc4(
            docs,
            Mmc4Options(images=images),
            RunOptions(out_dir=str(root / "out"), converter="mmc4", max_samples=50),
            execution=Execution(processes=2, progress=False),
        )
        shards = sorted((root / "out").glob("*.tar"))
        size = sum(p.stat().st_size for p in shards)
        print(f"input: {len(shards)} bytes-kept shards of web-like documents, {size / 1e6:.0f} MB")
        results = {"shards": len(shards), "bytes": size}
        for deep in (False, True):
            name = "deep" if deep else "default"
            base = seconds(lambda deep=deep: naive_loop(shards, deep))
            row = {"baseline_seconds": base}
            for processes in (1, 2):
                ours = seconds(
                    lambda deep=deep, p=processes: validate_shards(
                        str(root / "out"), deep=deep, processes=p
                    )
                )
                row[f"processes_{processes}"] = {"seconds": ours, "ratio": ours / base}
                print(
                    f"validate {name:<8} --processes {processes}: {ours:6.2f} s = "
                    f"{ours / base:4.2f}x the naive loop's {base:.2f} s (goal <= 0.5x)"
                )
            results[name] = row
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
