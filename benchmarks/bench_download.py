"""Downloading images by url: flamingo-data against img2dataset's own download, in one run, on the same urls.

The urls are a local web on 127.0.0.1 (benchmarks/website.py: many sites, a port each, each with its
robots.txt): web-like images (weblike.py's mix, 300-1,200 px) beside 404s, 500s, an HTML page where an
image was linked, redirects, opted-out images and, optionally, slow urls past the timeout; MMC4 documents
name them ~3 to a document, a few urls shared by several documents. Each row's stored and refused urls
are checked against what the site sets up (img2dataset never reads robots.txt; flamingo-data does). Every row runs in a fresh process on the documents' url list (shared urls once per
document), with the same processes, threads, timeout, retries and opt-out directives (the download
rows also the same shard size; the CLI has its own):
- img2dataset: its own ``download`` (webdataset output, ``resize_mode="no"``,
  ``disable_all_reencoding=True``, ``distributor="multiprocessing"``, no wandb, no hash);
- flamingo-data download: ``fetch_url_images`` (each distinct url once, every fetch bounded in time
  and size, opt-out checks, a per-url journal);
- flamingo-data convert: ``flamingo-data convert mmc4 --download-images`` end to end, when the
  installed CLI has that option: documents in, shards out.
Wall time is the process's from start to exit (start and imports included); "fetching" runs from the
site's first request to its last answer; CPU is user + sys of the process and of every process it
started. images/s counts distinct urls whose bytes were stored. Each row also has a start run (one url
per process, each its own shard; the CLI's: the first document): its CPU taken off gives "CPU after
the start". Rows run in turn,
``--repeats`` rounds; the figures are medians.
Usage: python benchmarks/bench_download.py [--urls 2000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from website import Hit, Site, build_site, serve, write_documents  # noqa: E402

from flamingo_data.fetch.i2d_output import failure_reason, finished_shards, read_rows  # noqa: E402
from flamingo_data.fetch.i2d_run import OPT_OUT_DIRECTIVES  # noqa: E402
from flamingo_data.fetch.url_images import URLS_PER_SHARD  # noqa: E402
from flamingo_data.run.executors import default_processes  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "download_runs.py"
BASELINE = "img2dataset"
DOWNLOAD = "flamingo-data download"
CONVERT = "flamingo-data convert mmc4 --download-images"
DEFAULTS = {
    "urls": 2000,
    "sites": 400,
    "distinct_images": 500,
    "slow": 0,
    "repeats": 3,
    "start_runs": True,
}
QUICK = {
    "urls": 40,
    "sites": 8,
    "distinct_images": 40,
    "slow": 0,
    "repeats": 1,
    "start_runs": False,
}


@dataclass
class Row:
    """One measured run: wall seconds, the seconds from the site's first request to its last
    answer (``fetch_seconds``), CPU seconds (user + sys, children included), requests the site
    answered, and what the output holds; ``start_*``: the same tool's start run (one url per
    process, each its own shard, so every worker starts as in the whole run; for the CLI, the
    first document)."""

    seconds: float
    fetch_seconds: float
    cpu_seconds: float
    requests: int
    robots_requests: int  # of them, for a robots.txt
    images: int  # distinct urls whose bytes were stored
    stored_rows: int  # rows stored, a url named twice counted twice
    failed: dict[str, int] = field(default_factory=dict)  # distinct urls by reason
    extra: dict[str, int] = field(default_factory=dict)
    server_cpu_seconds: float = 0.0
    start_seconds: float | None = None  # None: no start run (--quick)
    start_cpu_seconds: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_s_fetching(self) -> float:
        return self.images / self.fetch_seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.images)

    @property
    def cpu_ms_per_image_after_start(self) -> float | None:
        """None without a start run, or where it cost as much CPU as the whole one."""
        if self.start_cpu_seconds is None:
            return None
        spent = self.cpu_seconds - self.start_cpu_seconds
        return 1000 * spent / self.images if spent > 0 and self.images else None

    def as_json(self, baseline: Row | None) -> dict:
        figures = (
            "images_per_s",
            "images_per_s_fetching",
            "cpu_ms_per_image",
            "cpu_ms_per_image_after_start",
        )
        result = {**asdict(self), **{name: getattr(self, name) for name in figures}}
        if baseline is not None:
            result["speed_ratio"] = self.images_per_s / baseline.images_per_s
            result["fetching_speed_ratio"] = (
                self.images_per_s_fetching / baseline.images_per_s_fetching
            )
            result["cpu_ratio"] = self.cpu_ms_per_image / baseline.cpu_ms_per_image
            result["cpu_ratio_after_start"] = ratio(
                self.cpu_ms_per_image_after_start, baseline.cpu_ms_per_image_after_start
            )
        return result


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


@dataclass(frozen=True)
class Run:
    """What one process cost: wall seconds, seconds from the first request the site got to its
    last answer, CPU seconds, requests served, the server's own CPU seconds."""

    seconds: float
    fetch_seconds: float
    cpu_seconds: float
    requests: int
    robots_requests: int
    server_cpu_seconds: float


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], hits: list[Hit], args: argparse.Namespace) -> Run:
    """``command`` run to its exit; the server runs in this process, so its CPU is apart."""
    children, server, served = (
        cpu_seconds(resource.RUSAGE_CHILDREN),
        cpu_seconds(resource.RUSAGE_SELF),
        len(hits),
    )
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{' '.join(command[:4])} ... ran past --run-timeout") from None
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")
    these = hits[served:]
    return Run(
        seconds,
        max(h.answered for h in these) - min(h.arrived for h in these) if these else seconds,
        cpu_seconds(resource.RUSAGE_CHILDREN) - children,
        len(these),
        sum(1 for h in these if h.path == "/robots.txt"),
        cpu_seconds(resource.RUSAGE_SELF) - server,
    )


def outcome(folder: Path) -> tuple[int, int, dict[str, int]]:
    """(distinct urls stored, rows stored, distinct failed urls by reason) of an img2dataset output."""
    shards = finished_shards(folder)
    if not shards:
        raise SystemExit(f"no finished img2dataset shard in {folder}")
    rows = pd.concat([read_rows(tar.with_suffix(".parquet")) for tar in shards])
    ok = rows["status"] == "success"
    stored = set(rows.loc[ok, "url"])
    failed = {
        row.url: failure_reason(row.error_message, str(row.status))
        for row in rows[~ok].itertuples()
        if row.url not in stored
    }
    return len(stored), int(ok.sum()), dict(Counter(failed.values()).most_common())


@dataclass(frozen=True)
class Tool:
    """A row's command on the start input (``start``) or on the whole input (``whole``), writing
    under a folder whose ``images`` subfolder is then an img2dataset output."""

    label: str
    command: Callable[[str, Path], list[str]]
    extra: Callable[[Path], dict[str, int]] = lambda folder: {}


def download_tool(tool: str, lists: dict[str, Path], args: argparse.Namespace) -> Tool:
    def command(which: str, folder: Path) -> list[str]:
        urls, out = str(lists[which]), str(folder / "images")
        return [sys.executable, str(RUNNER), tool, urls, out, *download_flags(args, which)]

    return Tool(BASELINE if tool == "img2dataset" else DOWNLOAD, command)


def download_flags(args: argparse.Namespace, which: str) -> list[str]:
    per_shard = 1 if which == "start" else args.per_shard
    return [
        *("--processes", str(args.processes), "--threads", str(args.threads)),
        *("--timeout", str(args.timeout), "--retries", str(args.retries)),
        *("--per-shard", str(per_shard), "--opt-out", ",".join(OPT_OUT_DIRECTIVES)),
    ]


def convert_tool(docs: dict[str, Path], args: argparse.Namespace) -> Tool:
    def command(which: str, folder: Path) -> list[str]:
        return [
            *(sys.executable, "-m", "flamingo_data", "convert", "mmc4", "--docs", str(docs[which])),
            *("--download-images", "--images", str(folder / "images")),
            *("--out", str(folder / "out"), "--no-progress"),
            *("--processes", str(args.processes), "--download-processes", str(args.processes)),
            *("--threads", str(args.threads), "--timeout", str(args.timeout)),
            *("--retries", str(args.retries)),
        ]

    def written(folder: Path) -> dict[str, int]:
        stats = json.loads((folder / "out" / "stats.json").read_text())
        counts, reasons = stats["counts"], stats.get("reasons", {}).get("images", {})
        return {
            **{
                f"{kind}_{outcome}": n
                for kind in ("documents", "images")
                for outcome, n in counts.get(kind, {}).items()
            },
            **{f"images_rejected_{reason}": n for reason, n in reasons.items()},
        }

    return Tool(CONVERT, command, written)


def cli_has_download_images() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "convert", "mmc4", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "--download-images" in done.stdout


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.seconds for r in runs),
        statistics.median(r.fetch_seconds for r in runs),
        statistics.median(r.cpu_seconds for r in runs),
        runs[0].requests,
        runs[0].robots_requests,
        statistics.median(r.server_cpu_seconds for r in runs),
    )


def measure(
    tools: list[Tool], root: Path, hits: list[Hit], args: argparse.Namespace
) -> dict[str, Row]:
    """Each tool's start and whole runs, ``args.repeats`` rounds of every tool in turn (drift on
    a shared machine then hits every row alike); medians, and the first whole run's output."""
    inputs = ("start", "whole") if args.start_runs else ("whole",)
    runs: dict[str, dict[str, list[Run]]] = {t.label: {"start": [], "whole": []} for t in tools}
    outputs: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for tool in tools:
            for which in inputs:
                folder = root / "run"
                runs[tool.label][which].append(timed(tool.command(which, folder), hits, args))
                if which == "whole" and tool.label not in outputs:
                    outputs[tool.label] = (*outcome(folder / "images"), tool.extra(folder))
                shutil.rmtree(folder)
    rows = {}
    for label, by_input in runs.items():
        run = median_run(by_input["whole"])
        start = median_run(by_input["start"]) if by_input["start"] else None
        images, stored_rows, failed, extra = outputs[label]
        rows[label] = Row(
            *(run.seconds, run.fetch_seconds, run.cpu_seconds, run.requests, run.robots_requests),
            *(images, stored_rows, failed, extra),
            run.server_cpu_seconds,
            *((start.seconds, start.cpu_seconds) if start else (None, None)),
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, help="distinct urls (2000)")
    parser.add_argument("--sites", type=int, help="sites the urls are on, a port each (400)")
    parser.add_argument(
        "--distinct-images", type=int, help="images generated, reused over the urls (500)"
    )
    parser.add_argument("--slow", type=int, help="urls that answer after the timeout (0)")
    parser.add_argument("--processes", type=int, default=default_processes())
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=3, help="seconds per url")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--per-shard", type=int, default=None, help="urls per img2dataset shard")
    parser.add_argument("--repeats", type=int, help="rounds of every row, medians taken (3)")
    parser.add_argument(
        "--start-runs",
        action=argparse.BooleanOptionalAction,
        help="also run each tool on one url a process, to take its start off (default: not --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="defaults: 40 urls, no slow url, 1 round, no start runs",
    )
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds per row at most")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--scratch", default=None, help="folder for the outputs (default: temp)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    root = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.scratch))
    try:
        results = run_rows(args, root)
        report(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_rows(args: argparse.Namespace, root: Path) -> dict:
    site = build_site(args.urls, args.distinct_images, args.slow, args.timeout + 1.0, args.sites)
    with serve(site) as (base_urls, hits):
        docs = {"start": root / "one-doc.jsonl", "whole": root / "docs.jsonl"}
        references = write_documents(docs["whole"], base_urls, site)
        lines = docs["whole"].read_text().splitlines(keepends=True)
        docs["start"].write_text(lines[0])
        lists = {"start": root / "start-urls.parquet", "whole": root / "urls.parquet"}
        firsts = list(dict.fromkeys(references))[: args.processes]
        pd.DataFrame({"url": firsts}).to_parquet(lists["start"])
        pd.DataFrame({"url": references}).to_parquet(lists["whole"])
        # every process gets a shard of its own
        args.per_shard = args.per_shard or math.ceil(len(references) / args.processes)
        setup = setup_of(args, site, references, len(lines))
        print_setup(setup)
        tools = [download_tool(t, lists, args) for t in ("img2dataset", "flamingo-data")]
        if cli_has_download_images():
            tools.append(convert_tool(docs, args))
        else:
            print(f"({CONVERT} skipped: this flamingo-data's CLI has no --download-images)")
        rows = measure(tools, root, hits, args)
    baseline = rows[BASELINE]
    return {
        "setup": setup,
        "rows": {
            label: row.as_json(None if label == BASELINE else baseline)
            for label, row in rows.items()
        },
    }


def setup_of(args: argparse.Namespace, site: Site, references: list[str], documents: int) -> dict:
    return {
        "urls": len(site.paths),
        "references": len(references),
        "documents": documents,
        "distinct_images": min(args.urls, args.distinct_images),
        "kinds": dict(site.kinds.most_common()),
        "sites": len(site.robots),
        "robots": dict(Counter(site.robots).most_common()),
        "expected": {BASELINE: site.expected(False), DOWNLOAD: site.expected(True)},
        "processes": args.processes,
        "threads": args.threads,
        "timeout": args.timeout,
        "retries": args.retries,
        "per_shard": args.per_shard,
        "convert_per_shard": URLS_PER_SHARD,  # the CLI's, fixed
    }


def print_setup(setup: dict) -> None:
    kinds = ", ".join(f"{kind} {n}" for kind, n in setup["kinds"].items())
    print(
        f"site: {setup['urls']} urls ({kinds}); {setup['documents']} documents naming them "
        f"{setup['references']} times; {setup['distinct_images']} distinct images"
    )
    robots = ", ".join(f"{kind} {n}" for kind, n in setup["robots"].items())
    print(f"{setup['sites']} sites, their robots.txt: {robots}")
    print(
        f"{setup['processes']} processes x {setup['threads']} threads, timeout {setup['timeout']} s, "
        f"{setup['retries']} retry, {setup['per_shard']} urls per shard "
        f"(convert: the CLI's {setup['convert_per_shard']})"
    )


def figure(value: float | None, width: int, suffix: str = "") -> str:
    return f"{value:{width}.2f}{suffix}" if value is not None else f"{'-':>{width}}{suffix}"


def report(results: dict) -> None:
    rows = results["rows"]
    print(
        f"\n{'':<46} {'wall s':>6} {'images':>6} {'images/s':>8} {'fetching s':>10} "
        f"{'images/s':>8} {'CPU ms/img':>10} {'after start':>11} {'requests':>8}"
    )
    for label, row in rows.items():
        print(
            f"{label:<46} {row['seconds']:6.2f} {row['images']:6d} {row['images_per_s']:8.1f} "
            f"{row['fetch_seconds']:10.2f} {row['images_per_s_fetching']:8.1f} "
            f"{row['cpu_ms_per_image']:10.2f} {figure(row['cpu_ms_per_image_after_start'], 11)} "
            f"{row['requests']:8d}"
        )
    print(
        "(fetching: from the site's first request to its last answer; CPU after start: less the "
        "CPU of the tool's run on one url a process)\n"
    )
    expected = results["setup"]["expected"]
    for label, row in rows.items():
        failed = ", ".join(f"{reason} {n}" for reason, n in row["failed"].items())
        wanted = expected[BASELINE if label == BASELINE else DOWNLOAD]
        verdict = "as" if [row["images"], row["failed"]] == list(wanted.values()) else "NOT as"
        print(
            f"{label}: {row['images']} stored, failed urls: {failed} ({verdict} the site expects)"
        )
        if row["extra"]:
            print(f"{label}: " + ", ".join(f"{name} {n}" for name, n in row["extra"].items()))
    for label, row in rows.items():
        if "speed_ratio" in row:
            print(
                f"{label} / {BASELINE}: {row['speed_ratio']:.2f}x images/s "
                f"({row['fetching_speed_ratio']:.2f}x while fetching), "
                f"{row['cpu_ratio']:.2f}x CPU per image "
                f"({figure(row['cpu_ratio_after_start'], 0, 'x')} after the start)"
            )


if __name__ == "__main__":
    main()
