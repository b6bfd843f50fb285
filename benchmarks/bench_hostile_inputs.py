"""What hostile input and start-up cost, each against the standard library doing the same work in this run.

    python benchmarks/bench_hostile_inputs.py

- a tar whose pax header is all digits: ``tarfile`` (quadratic before CPython 3.11.10) against our reader;
- 20 MiB of blank jsonl lines: a Python line loop against the converter's line reader;
- the command line: ``flamingo-data --help`` and ``validate`` of one shard against importing torch alone.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from flamingo_data.converters.mmc4 import _numbered_lines
from flamingo_data.demo.sample_data import write_mmc4_sample
from flamingo_data.storage.safe_tar import UnsafeTar, open_tar


def pax_digits_tar(digits: int) -> bytes:
    """One extended header of ``digits`` ASCII digits (no valid record), then the end blocks."""
    body = b"9" * digits
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(body)
    padding = b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    return header.tobuf(format=tarfile.USTAR_FORMAT) + body + padding + b"\0" * 1024


STDLIB_READ = """
import io, sys, tarfile
data = sys.stdin.buffer.read()
try:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for _ in tar:
            pass
except tarfile.TarError:
    pass
"""


def stdlib_tar_seconds(data: bytes, limit_s: float) -> float | None:
    """``tarfile`` reading ``data`` in a child process; None when it is still at it after ``limit_s``."""
    began = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-c", STDLIB_READ], input=data, timeout=limit_s, check=True)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - began


def our_tar_seconds(data: bytes) -> float:
    began = time.perf_counter()
    try:
        with open_tar(io.BytesIO(data)) as tar:
            for _ in tar:
                pass
    except (UnsafeTar, tarfile.TarError):
        pass
    return time.perf_counter() - began


def line_loop_seconds(data: bytes) -> float:
    began = time.perf_counter()
    kept = sum(1 for line in io.BytesIO(data) if line.strip())
    assert kept == 0
    return time.perf_counter() - began


def our_lines_seconds(data: bytes) -> float:
    began = time.perf_counter()
    assert not list(_numbered_lines(io.BytesIO(data)))
    return time.perf_counter() - began


def command_seconds(argv: list[str], runs: int) -> float:
    """Median wall time of ``argv`` in a fresh process."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pax-digits", type=int, default=60_000, help="digits in the pax header")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds tarfile may take")
    parser.add_argument("--runs", type=int, default=5, help="runs per command-line timing")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    data = pax_digits_tar(args.pax_digits)
    stdlib, ours = stdlib_tar_seconds(data, args.limit), our_tar_seconds(data)
    shown = f"{stdlib:.2f} s" if stdlib is not None else f"over {args.limit:.0f} s"
    ratio = f"{stdlib / ours:,.0f}x" if stdlib is not None else "-"
    print(
        f"pax header of {args.pax_digits:,} digits: tarfile {shown}, ours {ours * 1e3:.2f} ms ({ratio})"
    )

    blank = b"\n" * (20 * 2**20)
    loop, lines = line_loop_seconds(blank), our_lines_seconds(blank)
    print(
        f"20 MiB of blank lines: line loop {loop:.2f} s, ours {lines:.3f} s ({loop / lines:,.0f}x)"
    )

    cli = [sys.executable, "-m", "flamingo_data"]
    with tempfile.TemporaryDirectory() as tmp:
        sample = write_mmc4_sample(Path(tmp) / "src", n_shards=1, docs_per_shard=8)
        out = Path(tmp) / "out"
        convert = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
        subprocess.run([*cli, *convert, "--out", str(out)], check=True, capture_output=True)
        shard = str(next(out.glob("*.tar")))
        torch = command_seconds([sys.executable, "-c", "import torch"], args.runs)
        help_s = command_seconds([*cli, "--help"], args.runs)
        validate = command_seconds([*cli, "validate", shard], args.runs)
    print(
        f"start-up: import torch {torch:.2f} s; flamingo-data --help {help_s:.2f} s, "
        f"validate one shard {validate:.2f} s"
    )
    if args.json:
        results = {
            "pax_header": {
                "digits": args.pax_digits,
                "tarfile_seconds": stdlib,
                "ours_seconds": ours,
            },
            "blank_lines_20mib": {"line_loop_seconds": loop, "ours_seconds": lines},
            "start_up": {"import_torch": torch, "help": help_s, "validate_one_shard": validate},
        }
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
