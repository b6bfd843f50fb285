"""Runs under hostile conditions: a killed main process, damaged completion markers, runs that
write nothing or drop most of their input. Real processes, real signals, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flamingo_data.cli.main import main as cli
from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.errors import NothingWritten
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions, drop_work
from tests.conftest import Route, serve, work_kept

CLI = [sys.executable, "-m", "flamingo_data.cli.main"]
GONE_WITHIN_S = 30  # generous: the property is "they exit", not how fast
FAST = DownloadOptions(processes=1, threads=4, timeout=1, retries=0)


def cli_run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent
    )


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, from /proc (no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = next(
            (line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), ""
        )
        if ppid == str(pid):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its new parent to reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def wait_for_children(proc: subprocess.Popen, count: int) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(kids := children_of(proc.pid)) >= count:
            return kids
        time.sleep(0.01)
    pytest.fail(f"the run started no {count} worker processes (exit {proc.poll()})")


def kill_and_check_orphans(proc: subprocess.Popen, workers: int) -> None:
    """Freeze the main process once its workers exist (so the run cannot end on its own), kill it
    with SIGKILL, then every worker must exit by itself."""
    wait_for_children(proc, workers)
    os.kill(proc.pid, signal.SIGSTOP)
    orphans = children_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline and any(alive(p) for p in orphans):
        time.sleep(0.05)
    left = [p for p in orphans if alive(p)]
    for pid in left:  # do not leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert orphans and not left, f"workers still alive after their parent was killed: {left}"


POOL_SCRIPT = """
import sys, time
from flamingo_data.run.procpool import map_in_processes

def task(item):
    time.sleep(600)  # busy for the whole test: only the parent's death can end it
    return item

if __name__ == "__main__":
    for _ in map_in_processes(task, list(range(8)), int(sys.argv[2]), sys.argv[1]):
        pass
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("processes", [2, 3])
def test_pool_workers_exit_when_their_parent_is_killed(
    tmp_path: Path, start_method: str, processes: int
) -> None:
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), start_method, str(processes)])
    try:
        kill_and_check_orphans(proc, processes)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_img2dataset_workers_exit_when_main_is_killed(tmp_path: Path) -> None:
    generator = serve()
    server = next(generator)
    for i in range(8):  # every fetch stalls: the workers are busy when the main process dies
        server.routes[f"/stall{i}.jpg"] = Route(b"", "image/jpeg", delay_s=120)
    urls = [server.url(f"stall{i}.jpg") for i in range(8)]
    pq.write_table(pa.table({"url": urls, "caption": ["c"] * 8}), tmp_path / "in.parquet")
    args = [
        "convert",
        "laion",
        "--parquet",
        str(tmp_path / "in.parquet"),
        "--download-processes",
        "2",
    ]
    proc = subprocess.Popen([*CLI, *args, "--out", str(tmp_path / "out"), "--timeout", "100"])
    try:
        kill_and_check_orphans(proc, 3)  # two workers and multiprocessing's resource tracker
    finally:
        if proc.poll() is None:
            proc.kill()
        generator.close()


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.mark.slow
def test_mmc4_workers_exit_when_main_is_killed_and_resume_matches_a_clean_run(
    tmp_path: Path,
) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=4, docs_per_shard=12, seed=11)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--no-progress", "--processes", "2"]
    proc = subprocess.Popen([*CLI, *args, "--out", str(tmp_path / "killed")])
    try:
        kill_and_check_orphans(proc, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = cli_run(*args, "--out", str(tmp_path / "killed"), "--resume")
    clean = cli_run(*args, "--out", str(tmp_path / "clean"))
    assert resumed.returncode == 0 == clean.returncode, resumed.stderr + clean.stderr
    assert tar_bytes(tmp_path / "killed") == tar_bytes(tmp_path / "clean") != {}
    for name in ("sizes.json", "stats.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "clean" / name).read_text()


# --- damaged markers ------------------------------------------------------------------------


def _mutated(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def damage(good: bytes) -> bytes:
        marker = json.loads(good)
        result = change(marker)
        return json.dumps(marker if result is None else result).encode()

    return damage


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(marker: dict) -> None:
        *parents, last = path.split(".")
        node = marker
        for name in parents:
            node = node[name]
        if last == "*":  # every entry of the dict
            for key in node:
                node[key] = value
        else:
            node[last] = value

    return change


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "one_byte": lambda good: good[:1],
    "cut_at_a_third": lambda good: good[: len(good) // 3],
    "cut_at_half": lambda good: good[: len(good) // 2],
    "last_byte_missing": lambda good: good[:-1],
    "zeros": lambda good: b"\0" * len(good),  # what a power loss can leave in place of the data
    "not_utf8": lambda good: b"\xff\xfe" + good,
    "null": lambda good: b"null",
    "list": lambda good: b"[]",
    "empty_object": lambda good: b"{}",
    "string": lambda good: b'"done"',
    "no_shards": _mutated(lambda m: m.pop("shards")),
    "no_stats": _mutated(lambda m: m.pop("stats")),
    "no_unit": _mutated(lambda m: m.pop("unit")),
    "shards_as_list": _mutated(lambda m: m.update(shards=list(m["shards"]))),
    "count_as_text": _mutated(_set("shards.*", "12")),
    "count_negative": _mutated(_set("shards.*", -1)),
    "count_as_bool": _mutated(_set("shards.*", True)),
    "counts_as_list": _mutated(_set("stats.counts", [])),
    "count_in_stats_as_text": _mutated(_set("stats.counts.documents", {"in": "3"})),
    "unit_as_number": _mutated(_set("unit", 7)),
}


def _damage_marker(out: Path, unit: str, damage: Callable[[bytes], bytes]) -> None:
    marker = out / "_done" / f"{unit}.json"
    marker.write_bytes(damage(marker.read_bytes()))
    (out / f"{unit}-99999.tar").write_bytes(b"partial output of the unfinished attempt")
    for name in ("sizes.json", "stats.json"):
        (out / name).unlink()


def _same_dataset(out: Path, clean: Path) -> None:
    assert tar_bytes(out) == tar_bytes(clean) != {}
    for name in ("sizes.json", "stats.json", "rejects.jsonl"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


@pytest.fixture(scope="module")
def mmc4_done(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("mmc4")
    sample = write_mmc4_sample(root / "src", n_shards=2, docs_per_shard=6, seed=2)
    convert_mmc4_into(sample, root / "clean", resume=False)
    return sample, root / "clean"


def convert_mmc4_into(sample: dict, out: Path, resume: bool) -> dict:
    run = RunOptions(out_dir=str(out), converter="mmc4", write_rejects=True, resume=resume)
    stats = convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        run,
        execution=Execution(processes=1, progress=False),
    )
    return stats.to_json()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_mmc4_resume_redoes_a_unit_whose_marker_is_damaged(mmc4_done, tmp_path, damage) -> None:
    sample, clean = mmc4_done
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    _damage_marker(out, "shard_0", DAMAGE[damage])
    convert_mmc4_into(sample, out, resume=True)
    _same_dataset(out, clean)
    assert not (out / "shard_0-99999.tar").exists()  # the unfinished attempt's output is discarded


def test_a_damaged_marker_of_a_unit_no_longer_in_the_input_is_counted(mmc4_done, tmp_path) -> None:
    sample, clean = mmc4_done
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    (out / "_done" / "gone.json").write_bytes(b"")
    stats = convert_mmc4_into(sample, out, resume=True)
    assert stats["counts"]["units"]["damaged_marker"] == 1
    assert tar_bytes(out) == tar_bytes(clean)


def test_cli_resume_with_an_empty_marker_is_no_traceback(mmc4_done, tmp_path) -> None:
    sample, clean = mmc4_done
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    _damage_marker(out, "shard_1", DAMAGE["empty"])
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    done = cli_run(*args, "--out", str(out), "--resume", "--rejects", "--no-progress")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    _same_dataset(out, clean)


CONVERSATIONS = [
    {"id": f"c{i}", "image": "a.jpg", "conversations": [{"from": "human", "value": f"<image> {i}"}]}
    for i in range(6)
]


@pytest.fixture(scope="module")
def conversations_done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("conv")
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(make_image(3))
    (root / "data.json").write_text(json.dumps(CONVERSATIONS))
    convert_conversations_into(root, root / "clean", resume=False)
    return root, root / "clean"


def convert_conversations_into(root: Path, out: Path, resume: bool) -> None:
    run = RunOptions(out_dir=str(out), converter="conversations", write_rejects=True, resume=resume)
    options = ConversationOptions(images=str(root / "images"))
    convert_conversations(
        str(root / "data.json"),
        options,
        run,
        chunk_size=2,
        execution=Execution(processes=1, progress=False),
    )


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_conversations_resume_redoes_a_unit_whose_marker_is_damaged(
    conversations_done, tmp_path, damage
) -> None:
    root, clean = conversations_done
    unit = sorted(p.stem for p in (clean / "_done").iterdir())[1]
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    _damage_marker(out, unit, DAMAGE[damage])
    convert_conversations_into(root, out, resume=True)
    _same_dataset(out, clean)


@pytest.fixture(scope="module")
def chatgpt_done(tmp_path_factory: pytest.TempPathFactory):
    generator = serve()
    server = next(generator)
    root = tmp_path_factory.mktemp("gpt")
    for name in ("a", "b"):
        sequences = []
        for k in range(3):
            server.add_image(f"{name}{k}.jpg", seed=k + (10 if name == "b" else 0))
            entry = {"_!_IMAGE1_!_": {"url": server.url(f"{name}{k}.jpg")}}
            sequences.append({"example": f"{name}{k} _!_IMAGE1_!_", "image_map": entry})
        (root / f"seq-{name}.json").write_text(json.dumps(sequences))
    try:
        with work_kept():
            convert_chatgpt(
                str(root / "seq-*.json"),
                ChatGptOptions(download=FAST),
                RunOptions(out_dir=str(root / "clean"), converter="chatgpt", write_rejects=True),
                execution=Execution(processes=1, progress=False),
            )
    finally:
        generator.close()
    shutil.copytree(root / "clean" / "_work" / "_images", root / "images")
    drop_work(root / "clean")
    return root, root / "clean"


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_chatgpt_resume_redoes_a_unit_whose_marker_is_damaged(
    chatgpt_done, tmp_path, damage
) -> None:
    root, clean = chatgpt_done
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    _damage_marker(out, "seq-a", DAMAGE[damage])
    convert_chatgpt(
        str(root / "seq-*.json"),
        ChatGptOptions(images_from=str(root / "images")),
        RunOptions(out_dir=str(out), converter="chatgpt", write_rejects=True, resume=True),
        execution=Execution(processes=1, progress=False),
    )
    _same_dataset(out, clean)


# --- runs that write nothing, or drop most of their input --------------------------------------


def _assert_failed_with_one_line(done: subprocess.CompletedProcess, *expected: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert all(text in lines[0] for text in expected), lines[0]


def test_conversations_with_an_image_root_one_level_too_deep_fails(conversations_done, tmp_path):
    root, _clean = conversations_done
    deeper = tmp_path / "images" / "sub"
    deeper.mkdir(parents=True)
    (tmp_path / "images" / "a.jpg").write_bytes(make_image(3))
    out = tmp_path / "out"
    args = ["convert", "conversations", "--json", str(root / "data.json"), "--images", str(deeper)]
    done = cli_run(*args, "--out", str(out), "--no-progress")
    _assert_failed_with_one_line(done, "0 of 6 documents written", "missing_image 6")
    assert json.loads((out / "stats.json").read_text())["counts"]["documents"]["rejected"] == 6
    assert (out / "sizes.json").exists()


@pytest.mark.parametrize("python_file", ["convert.py", "setup.py"])
def test_conversations_given_a_python_file_as_json_fails(tmp_path: Path, python_file: str) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / python_file).write_text("import json\nprint(json.dumps({}))\n")
    args = ["convert", "conversations", "--json", str(tmp_path / python_file)]
    args += ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--no-progress"]
    _assert_failed_with_one_line(cli_run(*args), "0 of 2 documents written", "bad_json 2")


@pytest.mark.parametrize("units", [1, 3])
def test_mmc4_given_unzipped_jsonl_as_zips_fails(tmp_path: Path, units: int) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=units, docs_per_shard=4, seed=4)
    for shard in range(units):  # the jsonl itself, under the zip's name
        path = tmp_path / "src" / "docs" / f"shard_{shard}.zip"
        with zipfile.ZipFile(path) as zf:
            data = zf.read(f"shard_{shard}.jsonl")
        path.write_bytes(data)
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--out", str(tmp_path / "out"), "--no-progress", "--processes", "1"]
    _assert_failed_with_one_line(cli_run(*args), "0 of 0 documents written", f"_zip {units}")
    assert (tmp_path / "out" / "stats.json").exists()


def test_mmc4_that_drops_every_document_fails(tmp_path: Path) -> None:
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=5, seed=6)
    for docs in sample["documents"]:  # every document misses one image; most images are there
        for doc in docs:
            name = doc["image_info"][0]["image_name"]
            for found in Path(sample["images"]).rglob(name):
                found.unlink()
    args = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    args += ["--out", str(tmp_path / "out"), "--no-progress", "--drop-docs-with-missing-images"]
    _assert_failed_with_one_line(cli_run(*args), "0 of 10 documents written", "missing_images")


def test_library_raises_nothing_written_after_writing_stats(conversations_done, tmp_path) -> None:
    root, _clean = conversations_done
    run = RunOptions(out_dir=str(tmp_path / "out"), converter="conversations")
    with pytest.raises(NothingWritten, match="0 of 6 documents written: missing_image 6"):
        convert_conversations(
            str(root / "data.json"),
            ConversationOptions(images=str(tmp_path)),
            run,
            execution=Execution(processes=1, progress=False),
        )
    assert (tmp_path / "out" / "stats.json").exists()


@pytest.mark.parametrize("share", ["-0.1", "1.5", "nan", "x"])
@pytest.mark.parametrize("converter", ["mmc4", "conversations", "chatgpt", "laion"])
def test_max_reject_share_outside_0_to_1_is_a_usage_error(
    tmp_path: Path, capsys, share: str, converter: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["convert", converter, "--out", str(tmp_path / "out"), "--max-reject-share", share])
    assert exited.value.code == 2
    assert "argument --max-reject-share:" in capsys.readouterr().err


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), float("inf"), "0.5"])
def test_max_reject_share_outside_0_to_1_is_a_typed_error(tmp_path: Path, share) -> None:
    with pytest.raises(ValueError, match="max_reject_share"):
        RunOptions(out_dir=str(tmp_path), converter="mmc4", max_reject_share=share)


def _mostly_missing(tmp_path: Path) -> list[str]:
    """Conversations: 2 of 5 items with their image, 3 without."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(make_image(5))
    items = [
        {"id": f"i{i}", "image": "a.jpg" if i < 2 else "gone.jpg", "conversations": []}
        for i in range(5)
    ]
    for item in items:
        item["conversations"] = [{"from": "human", "value": "<image> hi"}]
    (tmp_path / "data.json").write_text(json.dumps(items))
    args = ["convert", "conversations", "--json", str(tmp_path / "data.json")]
    return [*args, "--images", str(tmp_path / "images"), "--no-progress"]


@pytest.mark.parametrize(
    ("option", "warned"),
    [([], True), (["--max-reject-share", "0.5"], True), (["--max-reject-share", "0.6"], False)],
)
def test_a_run_that_drops_more_than_the_share_warns_and_exits_0(tmp_path, option, warned) -> None:
    """And a --resume with nothing left to do is judged on the dataset's totals: not an empty
    run, and the same warning."""
    args = _mostly_missing(tmp_path)
    expected = [
        "flamingo-data: warning: 3 of 5 documents not written (60%, over the max reject share"
        " 0.5): missing_image 3 (see stats.json)"
    ]
    for resume in ([], ["--resume"]):
        done = cli_run(*args, "--out", str(tmp_path / "out"), *option, *resume)
        assert done.returncode == 0, done.stderr
        warnings = [line for line in done.stderr.splitlines() if "warning" in line]
        assert warnings == (expected if warned else [])
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["counts"]["documents"] == {
        "in": 5,
        "rejected": 3,
        "written": 2,
    }


@pytest.mark.slow
def test_laion_whose_urls_are_all_dead_fails(tmp_path: Path) -> None:
    generator = serve()
    server = next(generator)  # no routes: every url answers 404
    urls = [server.url(f"dead{i}.jpg") for i in range(6)]
    pq.write_table(
        pa.table({"url": urls, "caption": [f"c{i}" for i in range(6)]}), tmp_path / "in.parquet"
    )
    args = ["convert", "laion", "--parquet", str(tmp_path / "in.parquet")]
    args += ["--out", str(tmp_path / "out"), "--timeout", "2", "--retries", "0"]
    try:
        done = cli_run(*args)
    finally:
        generator.close()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("flamingo-data:")]
    assert errors == ["flamingo-data: error: 0 of 6 samples written: http_404 6 (see stats.json)"]
    assert (tmp_path / "out" / "stats.json").exists()
