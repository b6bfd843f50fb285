"""Every benchmark script runs end to end on a tiny input, so none of them rots between releases.

Timings are never asserted (the machine running the suite is not the one the figures are for);
the scripts' own result files and lines are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY_ARGS = {
    "bench_convert_mmc4.py": [
        "--shards",
        "1",
        "--docs-per-shard",
        "6",
        "--repeats",
        "1",
        "--quick",
    ],
    "bench_validate.py": ["--shards", "1", "--docs-per-shard", "6"],
    "bench_decode_scales.py": ["--images", "3"],
    "bench_download.py": [
        *("--quick", "--slow", "1", "--timeout", "1", "--sites", "40", "--processes", "1"),
    ],
    "bench_hostile_inputs.py": ["--pax-digits", "2000", "--runs", "1"],
    "bench_loader.py": ["--docs-per-shard", "4", "--repeats", "1", "--quick"],
    "bench_quality_at_224.py": ["--images", "3"],
    "bench_resize_filters.py": ["--images", "3"],
}
CHECKED_BELOW = {
    "bench_convert_mmc4.py",
    "bench_validate.py",
    "bench_download.py",
}  # their JSON checked field by field


def test_every_benchmark_script_is_listed_here() -> None:
    assert {p.name for p in BENCHMARKS.glob("bench_*.py")} == set(TINY_ARGS)


def run(script: str, tmp_path: Path, extra: list[str]) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *TINY_ARGS[script], *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(TINY_ARGS) - CHECKED_BELOW))
def test_benchmark_runs_on_a_tiny_input_and_writes_its_json(script: str, tmp_path: Path) -> None:
    assert run(script, tmp_path, ["--json", str(tmp_path / "r.json")]).strip()
    result = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(result, dict) and result


@pytest.mark.slow
def test_convert_benchmark_reports_its_ratios_on_web_like_input(tmp_path: Path) -> None:
    out = run("bench_convert_mmc4.py", tmp_path, ["--json", str(tmp_path / "r.json")])
    assert "web-like images" in out and "dd conv=fsync" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["input"] == "web"
    assert result["keep"]["speedup"] > 0 and result["keep"]["vs_dd"] > 0
    assert 0 < result["resized"]["--short-side 256"]["bytes_ratio"] < 1


@pytest.mark.slow
def test_validate_benchmark_reports_both_modes_and_process_counts(tmp_path: Path) -> None:
    run("bench_validate.py", tmp_path, ["--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    for mode in ("default", "deep"):
        assert result[mode]["baseline_seconds"] > 0
        assert {"processes_1", "processes_2"} <= set(result[mode])


@pytest.mark.slow
def test_download_benchmark_runs_both_tools_on_the_same_urls_with_the_outcomes_the_site_sets(
    tmp_path: Path,
) -> None:
    out = run("bench_download.py", tmp_path, ["--json", str(tmp_path / "r.json")])
    assert "flamingo-data download / img2dataset:" in out and "NOT as the site expects" not in out
    result = json.loads((tmp_path / "r.json").read_text())
    setup, rows = result["setup"], result["rows"]
    kinds, expected = setup["kinds"], setup["expected"]
    assert setup["urls"] == 41 and kinds["slow"] == 1 and setup["references"] > setup["urls"]
    # the tiny site has robots.txt files that refuse the img2dataset token or cannot be read
    assert {"disallows_img2dataset", "unreachable"} <= set(setup["robots"])
    stored = [k for k in kinds if k.startswith("image_") and k != "image_missing"]
    failed = {
        "http_404": kinds.get("not_found", 0) + kinds.get("image_missing", 0),
        "http_500": kinds.get("server_error", 0),
        "opted_out": kinds.get("opted_out", 0),
        "timeout": 1,
    }
    assert expected["img2dataset"] == {
        "images": sum(kinds[k] for k in (*stored, "html", "redirect") if k in kinds),
        "failed": {reason: n for reason, n in failed.items() if n},
    }
    for label, row in rows.items():  # what each tool stores and refuses, by reason
        assert [row["images"], row["failed"]] == list(
            expected["img2dataset" if label == "img2dataset" else "flamingo-data download"].values()
        )
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0 and row["start_seconds"] is None
        assert row["images_per_s"] > 0 and row["cpu_ms_per_image"] > 0
        assert 0 < row["fetch_seconds"] < row["seconds"]  # the site's clock inside the run's
    base, ours = rows["img2dataset"], rows["flamingo-data download"]
    assert ours["failed"]["robots_unreachable"] > 0 and ours["images"] < base["images"]
    # img2dataset fetches and stores a shared url once per document naming it, ours once; only
    # ours asks for robots.txt
    assert base["stored_rows"] > base["images"] and ours["stored_rows"] == ours["images"]
    assert base["robots_requests"] == 0 < ours["robots_requests"]
    assert ours["requests"] - ours["robots_requests"] < base["requests"]
    for row in [r for label, r in rows.items() if label != "img2dataset"]:
        assert min(row["speed_ratio"], row["fetching_speed_ratio"], row["cpu_ratio"]) > 0
    convert = rows["flamingo-data convert mmc4 --download-images"]["extra"]
    assert convert["documents_in"] == setup["documents"] and convert["documents_written"] > 0
    assert convert["images_in"] == setup["references"]
    assert convert["images_found"] + convert["images_rejected"] == setup["references"]
    # what the download stored but is no image is refused by the image stage, each by its reason
    refused = {k.removeprefix("images_rejected_") for k in convert if "_rejected_" in k}
    assert refused - set(ours["failed"]) <= {"not_an_image", "truncated"}
    assert refused - set(ours["failed"])
