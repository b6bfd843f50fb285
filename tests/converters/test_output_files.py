"""What a successful run leaves in ``--out``: exactly the files of docs/formats.md's table
(``OUTPUT_FILES``, which the docs test holds the table to), for every converter, with and without
``--rejects``; no tar beside the shards but the shards; a ``--resume`` of it changes no byte and
fetches nothing; an interrupted run keeps its work folder and resumes (or is overwritten) to the
same files."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.laion import LaionOptions, convert_laion
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.converters.obelics import ObelicsOptions, convert_obelics
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.fetch.url_images import UrlImages
from flamingo_data.run import driver
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import OUTPUT_FILES, WORK_DIR, OutputFile, RunOptions
from tests.conftest import LocalServer, serve
from tests.test_upstream_compat import write_img2dataset_output

FAST = DownloadOptions(processes=1, threads=2, timeout=2, retries=0, samples_per_shard=2)
ONE = Execution(processes=1, progress=False)
CONVERTERS = ("mmc4", "laion", "chatgpt", "conversations", "obelics")
# img2dataset runs take seconds each: those converters' cases are slow
BY_CONVERTER = [
    pytest.param(n, marks=[pytest.mark.slow] if n in ("laion", "chatgpt") else [])
    for n in CONVERTERS
]
HOWS = ("resume", "overwrite")
WORK = {
    "mmc4": set(),
    "laion": {"_download"},
    "chatgpt": {"_images"},
    "conversations": {"_chunks"},
    "obelics": set(),
}

Convert = Callable[..., object]  # (out, rejects, resume=, overwrite=) -> Stats


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    generator = serve()
    yield next(generator)
    generator.close()


@pytest.fixture(scope="module")
def inputs(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real inputs of every converter; urls on the local server, one of them a 404."""
    root = tmp_path_factory.mktemp("inputs")
    write_mmc4_sample(root / "mmc4", n_shards=2, docs_per_shard=3)
    urls = [server.url(f"out{k}.jpg") for k in range(3)] + [server.url("gone.jpg")]
    for k in range(3):
        server.add_image(f"out{k}.jpg", seed=40 + k)
    captions = ["a", "b", "c", "gone"]
    pd.DataFrame({"url": urls, "caption": captions}).to_parquet(root / "pairs.parquet")
    sequences = [
        {"example": f"{c} _!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {"url": u}}}
        for u, c in zip(urls, captions, strict=True)
    ]
    (root / "seq-0.json").write_text(json.dumps(sequences[:2]))
    (root / "seq-1.json").write_text(json.dumps(sequences[2:]))
    (root / "images").mkdir()
    (root / "images" / "cat.jpg").write_bytes(make_image(21, 160, 120, "JPEG"))
    turns = [{"from": "human", "value": "What is <image>?"}, {"from": "gpt", "value": "A cat."}]
    items = [{"id": f"c{k}", "image": "cat.jpg", "conversations": turns} for k in range(3)]
    items.append({"id": "bad", "image": "absent.jpg", "conversations": turns})
    (root / "talk.json").write_text(json.dumps(items))
    # OBELICS-style documents over an img2dataset output written directly (no download)
    pictures = [(f"http://127.0.0.1:9/o{k}.jpg", "", make_image(50 + k), "jpg") for k in range(2)]
    write_img2dataset_output(root / "obelics-i2d", pictures)
    for part in range(2):
        docs = [
            {"images": [None, url], "texts": [f"doc {part}.{k}", None]}
            for k, (url, *_rest) in enumerate([*pictures, ("http://127.0.0.1:9/gone.jpg",)])
        ]
        lines = "".join(json.dumps(d) + "\n" for d in docs)
        (root / f"obelics-{part}.jsonl").write_text(lines)
    return root


def runner(name: str, root: Path) -> Convert:
    """A real run of ``name`` on the ``inputs`` into ``out``; units are small, so there are two."""

    def run(out: Path, rejects: bool, resume: bool = False, overwrite: bool = False):
        options = RunOptions(
            out_dir=str(out), converter=name, write_rejects=rejects, resume=resume, max_samples=2
        )
        common = {"overwrite": overwrite, "execution": ONE}
        if name == "mmc4":
            mmc4 = Mmc4Options(images=str(root / "mmc4" / "images"))
            docs = str(root / "mmc4" / "docs" / "shard_{0..1}.zip")
            return convert_mmc4(docs, mmc4, options, **common)
        if name == "laion":
            laion = LaionOptions(download=FAST)
            return convert_laion(str(root / "pairs.parquet"), laion, options, **common)
        if name == "chatgpt":
            gpt = ChatGptOptions(download=FAST)
            return convert_chatgpt(str(root / "seq-{0..1}.json"), gpt, options, **common)
        if name == "obelics":
            obelics = ObelicsOptions(images=UrlImages(str(root / "obelics-i2d")))
            return convert_obelics(str(root / "obelics-{0..1}.jsonl"), obelics, options, **common)
        talk = ConversationOptions(images=str(root / "images"))
        return convert_conversations(str(root / "talk.json"), talk, options, chunk_size=2, **common)

    return run


def pattern(name: str) -> re.Pattern[str]:
    """The table's name as a regular expression: ``<...>`` is one name, ``NNNNN`` five digits."""
    text = re.escape(name).replace("NNNNN", r"\d{5}")
    return re.compile(re.sub(r"<[a-z]+>", "[^/]+", text))


def documented(name: str, rejects: bool) -> list[OutputFile]:
    return [
        f
        for f in OUTPUT_FILES
        if (not f.converters or name in f.converters) and (rejects or not f.rejects_only)
    ]


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def assert_tidy(out: Path, name: str, rejects: bool) -> None:
    """``out`` holds each documented file, nothing else, no empty folder; its tars are the shards
    of sizes.json."""
    files = files_of(out)
    rows = documented(name, rejects)
    stray = [f for f in files if not any(pattern(r.name).fullmatch(f) for r in rows)]
    absent = [r.name for r in rows if not any(pattern(r.name).fullmatch(f) for f in files)]
    assert (stray, absent) == ([], []), sorted(files)
    assert [d for d in out.rglob("*") if d.is_dir() and not any(d.iterdir())] == []
    tars = sorted(p.relative_to(out).as_posix() for p in out.glob("**/*.tar"))
    assert tars and tars == sorted(json.loads(files["sizes.json"]))


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """shard -> member -> bytes: img2dataset may write a shard's samples in another order."""
    shards = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            shards[shard.name] = {m.name: tar.extractfile(m).read() for m in tar}
    return shards


def same_output(got: Path, want: Path, name: str) -> None:
    """The same files with the same bytes (markers: but the ``source`` path, which names a chunk
    in the run's own work folder; LAION: the same samples, and img2dataset's sidecars, which carry
    its timings, by name)."""
    got_files, want_files = files_of(got), files_of(want)
    assert sorted(got_files) == sorted(want_files)
    for files in (got_files, want_files):
        for marker in [f for f in files if f.startswith("_done/")]:
            files[marker] = {**json.loads(files[marker]), "source": None}
    if name != "laion":
        assert got_files == want_files
        return
    assert shard_members(got) == shard_members(want)
    for file in ("sizes.json", "stats.json", "_settings.json"):
        assert got_files[file] == want_files[file]


@pytest.fixture(scope="module")
def finished(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """(out, stats) of one successful run per converter and --rejects setting, made when first
    asked for."""
    runs: dict[tuple[str, bool], tuple[Path, dict]] = {}

    def get(name: str, rejects: bool) -> tuple[Path, dict]:
        if (name, rejects) not in runs:
            out = tmp_path_factory.mktemp(f"{name}-{rejects}") / "out"
            runs[name, rejects] = out, runner(name, inputs)(out, rejects).to_json()
        return runs[name, rejects]

    return get


@pytest.mark.parametrize("rejects", [False, True], ids=["plain", "rejects"])
@pytest.mark.parametrize("name", BY_CONVERTER)
def test_a_successful_run_leaves_the_documented_files_only(finished, name, rejects) -> None:
    out, stats = finished(name, rejects)
    assert_tidy(out, name, rejects)
    assert not (out / WORK_DIR).exists()
    assert stats["counts"]["units"]["done"] == 2


@pytest.mark.parametrize("name", BY_CONVERTER)
def test_resume_of_a_finished_run_changes_nothing_and_fetches_nothing(
    finished, inputs, server, name
) -> None:
    out, stats = finished(name, True)
    before, hits = files_of(out), dict(server.hits)
    again = runner(name, inputs)(out, True, resume=True).to_json()
    assert again == stats  # every unit reported done, with the counts of the run
    assert files_of(out) == before and server.hits == hits
    assert_tidy(out, name, True)


def interrupted_after_one_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next run commits its first unit, then stops as a Ctrl-C would stop it."""
    real = driver.run_units

    def one_unit_then_stop(units, fn, run, execution) -> None:
        real(units[:1], fn, run, execution)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_units", one_unit_then_stop)


# the downloading converters once each way (they share the work-folder code and cost ~7 s a run)
INTERRUPTED = [
    *[pytest.param(n, how, id=f"{n}-{how}") for n in ("mmc4", "conversations") for how in HOWS],
    pytest.param("obelics", "resume", id="obelics-resume"),
    pytest.param("laion", "resume", id="laion-resume", marks=pytest.mark.slow),
    pytest.param("chatgpt", "overwrite", id="chatgpt-overwrite", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "how"), INTERRUPTED)
def test_an_interrupted_run_keeps_its_work_folder_until_it_succeeds(
    finished, inputs, tmp_path, monkeypatch, name, how
) -> None:
    convert = runner(name, inputs)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupted_after_one_unit(patch)
        with pytest.raises(KeyboardInterrupt):
            convert(out, True)
    kept = {p.name for p in (out / WORK_DIR).iterdir()} if (out / WORK_DIR).exists() else set()
    assert WORK[name] <= kept and not (out / "sizes.json").exists()
    assert len(list((out / "_done").iterdir())) == 1
    convert(out, True, **{how: True})
    assert_tidy(out, name, True)
    same_output(out, finished(name, True)[0], name)


@pytest.mark.slow
def test_a_download_loose_in_the_folder_is_resumed_without_fetching_again(
    finished, inputs, server, tmp_path, monkeypatch
) -> None:
    """An interrupted LAION run whose img2dataset output lies directly in --out (``_download/``)
    resumes from it: nothing is fetched again, and the run ends as tidy as any other."""
    convert = runner("laion", inputs)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupted_after_one_unit(patch)
        with pytest.raises(KeyboardInterrupt):
            convert(out, True)
    (out / WORK_DIR / "_download").rename(out / "_download")
    shutil.rmtree(out / WORK_DIR)
    hits = dict(server.hits)
    convert(out, True, resume=True)
    assert server.hits == hits
    assert_tidy(out, "laion", True)
    same_output(out, finished("laion", True)[0], "laion")
