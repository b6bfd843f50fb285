"""Our loader vs a baseline that processes samples the way open_flamingo's loader does, same shards, one run.

Baseline per sample: json.loads, base64-decode every image, full-size PIL decode, torchvision-style
Resize(224, bicubic) + CenterCrop + ToTensor + Normalize (re-stated with PIL/numpy; no torchvision),
one-to-one assignment, tokenization — fed through webdataset + a torch DataLoader.
Usage: python benchmarks/bench_loader.py [--docs-per-shard 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weblike import write_web_mmc4  # noqa: E402

from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4  # noqa: E402
from flamingo_data.images.stage import ImagePolicy  # noqa: E402
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer  # noqa: E402
from flamingo_data.loader.config import CLIP_MEAN, CLIP_STD  # noqa: E402
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions  # noqa: E402

BATCH = 8


def baseline_preprocess(sample, tokenizer):
    info = json.loads(sample[0])
    images, valid = [], []
    for i, entry in enumerate(info["image_info"]):
        if "image_base64" in entry:
            images.append(
                Image.open(io.BytesIO(base64.b64decode(entry["image_base64"]))).convert("RGB")
            )
            valid.append(i)
    sim = np.array(info["similarity_matrix"])[valid]
    rows, cols = linear_sum_assignment(-sim)
    kept = [images[r] for r, c in zip(rows, cols, strict=True) if sim[r, c] >= 0.24][:6]
    tensors = []
    for image in kept:
        w, h = image.size
        scale = 224 / min(w, h)
        image = image.resize(
            (max(224, round(w * scale)), max(224, round(h * scale))), Image.Resampling.BICUBIC
        )
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        arr = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
        tensors.append(torch.from_numpy(((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()))
    vision = torch.zeros(6, 3, 224, 224)
    if tensors:
        vision[: len(tensors)] = torch.stack(tensors)
    text = tokenizer(
        " ".join(info["text_list"]), max_length=256, padding="max_length", truncation=True
    )
    return vision, text["input_ids"][0]


def run_baseline(shards: list[str], workers: int) -> int:
    tokenizer = make_tokenizer(None)
    dataset = (
        wds.WebDataset(
            shards, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker
        )
        .to_tuple("json")
        .map(lambda s: baseline_preprocess(s, tokenizer))
        .batched(BATCH)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return sum(batch[0].shape[0] for batch in loader)


def run_ours(shards: list[str], workers: int, pixels: str = "float") -> int:
    config = LoaderConfig(
        batch_size=BATCH, num_workers=workers, shuffle_buffer=1, flip_prob=0.0, pixels=pixels
    )
    loader = build_loader([DatasetSpec("mmc4", shards)], make_tokenizer(None), config)
    return sum(batch["vision_x"].shape[0] for batch in loader)


class WorkerPeaks(threading.Thread):
    """Polls each DataLoader worker's peak RSS (VmHWM in /proc) while it is alive.

    getrusage(RUSAGE_CHILDREN) is unreliable here: it only covers children already reaped.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            for pid in _children():
                if (peak := _peak_rss_mb(pid)) is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _peak_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def child(kind: str, shards: list[str], workers: int) -> None:
    """Runs in its own process so that each config's workers are measured on their own."""
    runners = {"ours": run_ours, "ours-uint8": partial(run_ours, pixels="uint8")}
    fn = runners.get(kind, run_baseline)
    watcher = WorkerPeaks()
    watcher.start()
    start, cpu = time.perf_counter(), time.process_time()
    n = fn(shards, workers)
    seconds, main_cpu = time.perf_counter() - start, time.process_time() - cpu
    watcher.stopped.set()
    rss = max(watcher.peaks.values(), default=0.0)
    print(json.dumps({"samples": n, "seconds": seconds, "rss_mb": rss, "main_cpu": main_cpu}))


def measure(kind: str, shards: list[str], workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--workers", str(workers), *shards],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_median(kind: str, shards: list[str], workers: int, repeats: int) -> dict:
    """Median samples/s of ``repeats`` runs (our runs last ~1-2 s, so one run is noisy here);
    the peak RSS is the largest seen in any of them."""
    runs = [measure(kind, shards, workers) for _ in range(repeats)]
    runs.sort(key=lambda r: r["samples"] / r["seconds"])
    return {**runs[len(runs) // 2], "rss_mb": max(r["rss_mb"] for r in runs)}


def convert(docs: str, images: str, out: Path, policy: ImagePolicy) -> list[str]:
    convert_mmc4(
        docs,
        Mmc4Options(images=images, policy=policy),
        RunOptions(out_dir=str(out), converter="mmc4"),
        execution=Execution(processes=2, progress=False),
    )
    return sorted(str(p) for p in out.glob("*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs-per-shard", type=int, default=150)
    parser.add_argument("--child", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours per config (median)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="one worker only (a smoke run)")
    parser.add_argument("shards", nargs="*")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shards, args.workers)
    root = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        docs, images, _ = write_web_mmc4(root / "src", 4, args.docs_per_shard)
        kept = convert(docs, images, root / "kept", ImagePolicy())
        small = convert(docs, images, root / "small", ImagePolicy(short_side=256))
        print(f"ours: median of {args.repeats} runs; baseline: 1 run")
        print(
            f"{'config':<44} {'samples/s':>10} {'worker peak RSS MB':>20} {'main CPU ms/sample':>19}"
        )
        results: dict[str, dict] = {}
        for workers in (1,) if args.quick else (1, 2):
            runs = {
                f"baseline, bytes-kept shards, {workers} workers": measure(
                    "baseline", kept, workers
                )
            }
            for kind in ("ours", "ours-uint8"):
                for label, shards in (("bytes-kept shards", kept), ("--short-side 256", small)):
                    name = f"{kind}, {label}, {workers} workers"
                    runs[name] = measure_median(kind, shards, workers, args.repeats)
            for name, run in runs.items():
                rate = run["samples"] / run["seconds"]
                cpu_ms = 1000 * run["main_cpu"] / max(1, run["samples"])
                print(f"{name:<44} {rate:10.1f} {run['rss_mb']:20.0f} {cpu_ms:19.2f}")
                results[name] = {**run, "samples_per_s": rate, "main_cpu_ms_per_sample": cpu_ms}
        if not args.quick:
            report(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, dict]) -> None:
    rate = {name: row["samples_per_s"] for name, row in results.items()}
    for label in ("bytes-kept shards", "--short-side 256"):
        one, two = rate[f"ours, {label}, 1 workers"], rate[f"ours, {label}, 2 workers"]
        base = rate["baseline, bytes-kept shards, 1 workers"]
        print(
            f"ours, {label}: {one / base:.1f}x the baseline's samples/s (1 worker); "
            f"the second worker adds {100 * (two / one - 1):.0f}% (goal >= 60%)"
        )
        cpu = {
            p: results[f"{p}, {label}, 2 workers"]["main_cpu_ms_per_sample"]
            for p in ("ours", "ours-uint8")
        }
        print(
            f"  main process CPU per sample: {cpu['ours']:.2f} ms float, {cpu['ours-uint8']:.2f} ms uint8"
        )


if __name__ == "__main__":
    main()
