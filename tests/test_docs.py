"""README.md and docs/ stay true: every command and code example runs on small real inputs, every JSON
example parses (and passes its schema where it names one), the reason table covers the codes the source
emits, and neither the guide nor the code's comments carry dates or history."""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from flamingo_data.converters.conversations import ConversationOptions, convert_conversations
from flamingo_data.converters.laion import LaionOptions, convert_laion
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.fetch.i2d_run import DownloadOptions
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import OUTPUT_FILES, RunOptions, drop_work
from tests.conftest import Route, serve, work_kept

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCHEMAS = ROOT / "schemas"
FENCE = re.compile(r"^```([^`\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
RUN_LANGS = {"bash", "python"}
JSON_TAGS = {"", "jsonl", "interleaved", "gpt", "pair", "sizes", "stats"}

# (page, first line of the block) -> why the block cannot run in a test
NOT_RUN = {
    (
        "README.md",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[train]' && flamingo-data demo",
    ): "installs from the network into a new venv; tests/test_demo.py runs the demo, .ci/run the install",
    (
        "README.md",
        "pip install -e '.[dev]' && python -m pytest",
    ): "installs from the network and runs this whole suite: it is CI's own command (.ci/run)",
    (
        "docs/development.md",
        "pip install -e '.[dev]' && python -m pytest",
    ): "installs from the network and runs this whole suite: it is CI's own command (.ci/run)",
    (
        "docs/scale-out.md",
        "flamingo-data convert mmc4 --docs 's3://bucket/mmc4/docs_shard_{0..99}_v2.jsonl.zip' "
        "--images gs://bucket/images \\",
    ): "needs cloud buckets and s3fs/gcsfs; the memory:// example on the same page runs the same code path",
    (
        "docs/openflamingo-checkpoints.md",
        "model, image_processor, tokenizer = create_model_and_transforms(",
    ): "needs open_clip and downloaded weights; tests/train/test_openflamingo_run.py loads an exported"
    " file into open_flamingo's own model the same way",
    (
        "docs/openflamingo-checkpoints.md",
        "flamingo-data convert conversations --json llava/data.json --images llava/images --out conv-shards/",
    ): "needs the released weights on disk and GPUs; the stand-in block above it runs the same commands,"
    " and tests/train/test_seed_workflow.py checks the exported file in open_flamingo's own model",
}

# pages whose blocks read outputs another page makes: copied in from the prebuilt ones first
NEEDS = {
    "docs/validate.md": ["shards"],
    "docs/inspect-preview.md": ["shards"],
    "docs/loader.md": ["shards", "gpt-shards"],
    "docs/training.md": ["shards", "laion-shards"],
    "docs/openflamingo-checkpoints.md": ["shards"],
    "docs/convert-laion.md": ["existing-i2d-output"],
    "docs/convert-chatgpt.md": ["i2d-output"],
}
DOWNLOADED = {"laion-shards", "existing-i2d-output", "i2d-output"}

# pages about the repository itself: their blocks run in its root, and change nothing there
REPOSITORY_PAGES = {"docs/development.md"}
SLOW_PAGES = {
    "README.md",
    "docs/convert-laion.md",
    "docs/convert-chatgpt.md",
    "docs/convert-obelics.md",
    "docs/training.md",
    "docs/scale-out.md",
    "docs/openflamingo-checkpoints.md",
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    tag: str
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0] if self.code.strip() else ""


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with its info string split into language and tag."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        lang, _, tag = match.group(1).strip().partition(" ")
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(page_name(path), line, lang, tag.strip(), match.group(2)))
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]


def block_id(block: Block) -> str:
    return f"{block.page}:{block.line}"


# ---------------------------------------------------------------- the inputs the pages name


def _serve_images(server) -> dict[str, str]:
    """name -> url for the pictures every url-based example fetches, plus one dead url."""
    urls = {}
    for i, (name, fmt) in enumerate((("cat", "JPEG"), ("dog", "PNG"), ("bird", "JPEG"))):
        server.add_image(f"{name}.{fmt.lower()}", seed=10 + i, fmt=fmt, size=(160, 120))
        urls[name] = server.url(f"{name}.{fmt.lower()}")
    server.routes["/gone.jpg"] = Route(b"not here", "text/html", status=404)
    urls["gone"] = server.url("gone.jpg")
    return urls


def _write_mmc4(root: Path) -> None:
    """``mmc4/docs_shard_{0..1}_v2.jsonl.zip`` + ``mmc4/images/<position>/<name>`` (indexed), and
    the same lines re-hosted as ``mmc4-jsonl/docs_shard_0_v2.jsonl.gz`` and ``..._1_v2.jsonl.zst``."""
    sample = write_mmc4_sample(root / "_gen", n_shards=2, docs_per_shard=8, image_size=(160, 120))
    (root / "mmc4").mkdir()
    (root / "mmc4-jsonl").mkdir()
    for shard in range(2):
        with zipfile.ZipFile(root / "_gen" / "docs" / f"shard_{shard}.zip") as source:
            lines = source.read(f"shard_{shard}.jsonl")
        with zipfile.ZipFile(root / "mmc4" / f"docs_shard_{shard}_v2.jsonl.zip", "w") as zf:
            zf.writestr(f"docs_shard_{shard}_v2.jsonl", lines)
        rehosted = root / "mmc4-jsonl" / f"docs_shard_{shard}_v2.jsonl"
        if shard == 0:
            rehosted.with_name(rehosted.name + ".gz").write_bytes(gzip.compress(lines))
        else:
            zst = zstandard.ZstdCompressor().compress(lines)
            rehosted.with_name(rehosted.name + ".zst").write_bytes(zst)
    shutil.move(sample["images"], root / "mmc4" / "images")
    shutil.rmtree(root / "_gen")


def _write_mmc4_web(root: Path, urls: dict[str, str]) -> None:
    """``mmc4-web/docs_shard_{0..1}_v2.jsonl.gz``: MMC4 documents whose images are urls on the
    local server (one shared by both shards, one dead)."""
    (root / "mmc4-web").mkdir()
    shards = (("cat", "dog"), ("bird", "cat", "gone"))
    for number, names in enumerate(shards):
        doc = {
            "url": f"https://example.com/page-{number}",
            "text_list": [f"Picture {name} on the page." for name in names],
            "image_info": [
                {
                    "image_name": f"{name}.jpg",
                    "raw_url": urls[name],
                    "matched_text_index": i,
                    "matched_sim": 0.3,
                }
                for i, name in enumerate(names)
            ],
            "similarity_matrix": [
                [0.3 if j == i else 0.1 for j in range(len(names))] for i in range(len(names))
            ],
        }
        path = root / "mmc4-web" / f"docs_shard_{number}_v2.jsonl.gz"
        path.write_bytes(gzip.compress((json.dumps(doc) + "\n").encode()))


def _write_laion(root: Path, urls: dict[str, str]) -> None:
    (root / "laion").mkdir()
    rows = [("cat", "a cat"), ("dog", "a dog"), ("gone", "a lost picture"), ("bird", "a bird")]
    for part, chunk in enumerate((rows[:2], rows[2:])):
        frame = {"URL": [urls[n] for n, _ in chunk], "TEXT": [c for _, c in chunk]}
        frame["similarity"] = [0.3] * len(chunk)
        pd.DataFrame(frame).to_parquet(root / "laion" / f"part-{part:05d}.parquet")


def _write_gpt(root: Path, urls: dict[str, str]) -> None:
    (root / "gpt").mkdir()

    def seq(text: str, *names: str) -> dict:
        image_map = {f"_!_IMAGE{i}_!_": {"url": urls[n]} for i, n in enumerate(names, 1)}
        return {"example": text, "image_map": image_map}

    files = {
        "seq-000.json": [
            seq("A cat _!_IMAGE1_!_ and a dog _!_IMAGE2_!_.", "cat", "dog"),
            seq("A bird _!_IMAGE1_!_ and a lost one _!_IMAGE2_!_.", "bird", "gone"),
        ],
        "seq-001.json": [seq("Two pets: _!_IMAGE1_!_ then _!_IMAGE2_!_.", "dog", "cat")],
    }
    for name, items in files.items():
        (root / "gpt" / name).write_text(json.dumps(items, indent=1))


def _write_conversations(root: Path) -> None:
    (root / "images").mkdir()
    (root / "images" / "cat.jpg").write_bytes(make_image(21, 160, 120, "JPEG"))
    (root / "images" / "dog.png").write_bytes(make_image(22, 160, 120, "PNG"))
    items = [
        {
            "id": "cat-1",
            "image": ["cat.jpg", "dog.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with <image>."},
                {"from": "gpt", "value": "The first is a cat."},
            ],
        },
        {
            "id": "dog-1",
            "image": "dog.png",
            "conversations": [
                {"from": "system", "value": "Describe pictures."},
                {"from": "human", "value": "What is this?"},
                {"from": "gpt", "value": "A dog."},
            ],
        },
    ]
    (root / "data.json").write_text(json.dumps(items, indent=1))


def _write_obelics(root: Path, urls: dict[str, str]) -> None:
    """``obelics/web-00000.parquet`` in OBELICS's own schema (metadata as JSON strings) and
    ``obelics/web-00001.jsonl`` (metadata as objects); one image url is dead, one document has no text."""
    (root / "obelics").mkdir()

    def doc(page: str, *parts: str) -> dict:
        images = [urls.get(p) for p in parts]
        return {
            "images": images,
            "metadata": [{"src": u, "alt_text": "a pet"} if u else None for u in images],
            "general_metadata": {"url": page, "warc_filename": "crawl.warc.gz"},
            "texts": [None if p in urls else p for p in parts],
        }

    first = [
        doc("https://example.com/pets", "cat", "A cat on a mat.", "dog", "bird", "Two more pets."),
        doc("https://example.com/lost", "A lost picture:", "gone"),
    ]
    rows = [{**d, **{k: json.dumps(d[k]) for k in ("metadata", "general_metadata")}} for d in first]
    schema = pa.schema(
        [
            ("images", pa.list_(pa.string())),
            ("metadata", pa.string()),
            ("general_metadata", pa.string()),
            ("texts", pa.list_(pa.string())),
        ]
    )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), root / "obelics" / "web-00000.parquet"
    )
    second = [
        doc("https://example.com/bird", "Birds sing.", "bird"),
        doc("https://example.com/x", "dog"),
    ]
    text = "".join(json.dumps(d) + "\n" for d in second)
    (root / "obelics" / "web-00001.jsonl").write_text(text)


FAST = DownloadOptions(processes=1, threads=4, timeout=5, retries=0)


def _prebuild(inputs: Path, built: Path) -> None:
    """Shards the reading pages start from: shards/ (MMC4) and gpt-shards/ (conversations as GPT
    records: the same record kind as ChatGPT's, without a download)."""
    convert_mmc4(
        str(inputs / "mmc4" / "docs_shard_{0..1}_v2.jsonl.zip"),
        Mmc4Options(images=str(inputs / "mmc4" / "images")),
        RunOptions(out_dir=str(built / "shards"), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    convert_conversations(
        str(inputs / "data.json"),
        ConversationOptions(images=str(inputs / "images"), as_="gpt", system_template="{value}"),
        RunOptions(out_dir=str(built / "gpt-shards"), converter="conversations"),
        execution=Execution(processes=1, progress=False),
    )


def _download_every_url(built: Path, urls: dict[str, str]) -> None:
    """One img2dataset run over every url: laion-shards/ and the img2dataset outputs that
    ``--from-img2dataset`` and ``--images-from`` adopt."""
    every_url = built / "urls.parquet"
    pd.DataFrame({"url": list(urls.values()), "caption": list(urls)}).to_parquet(every_url)
    with work_kept():
        convert_laion(
            str(every_url),
            LaionOptions(download=FAST),
            RunOptions(out_dir=str(built / "laion-shards"), converter="laion"),
        )
    for name in ("existing-i2d-output", "i2d-output"):
        (built / name).mkdir()
        for path in (built / "laion-shards" / "_work" / "_download").glob("0*"):
            shutil.copyfile(path, built / name / path.name)
    drop_work(built / "laion-shards")


@pytest.fixture(scope="module")
def server() -> Iterator:
    generator = serve()
    yield next(generator)
    generator.close()


@pytest.fixture(scope="module")
def workspace(server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(inputs under the names the pages use, prebuilt outputs); urls point at the local server."""
    root = tmp_path_factory.mktemp("docs")
    inputs, built = root / "inputs", root / "built"
    inputs.mkdir()
    built.mkdir()
    urls = _serve_images(server)
    _write_mmc4(inputs)
    _write_mmc4_web(inputs, urls)
    _write_laion(inputs, urls)
    _write_gpt(inputs, urls)
    _write_conversations(inputs)
    _write_obelics(inputs, urls)
    _prebuild(inputs, built)
    return inputs, built


@pytest.fixture(scope="module")
def downloads(server, workspace: tuple[Path, Path]) -> Path:
    """The prebuilt outputs, plus what one img2dataset run over every url gives."""
    _, built = workspace
    _download_every_url(built, _serve_images(server))
    return built


def _tool_shims(folder: Path) -> Path:
    """``torchrun`` and ``ruff`` as the running interpreter's modules, for a venv whose bin lacks
    their scripts (one layered over another's site-packages)."""
    folder.mkdir(exist_ok=True)
    for tool, module in (("torchrun", "torch.distributed.run"), ("ruff", "ruff")):
        if not (Path(sys.executable).parent / tool).exists():
            shim = folder / tool
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            shim.chmod(0o755)
    return folder


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(Path(sys.executable).parent), str(_tool_shims(scratch / "bin"))]
    env["PATH"] = os.pathsep.join([*path, env.get("PATH", "")])
    env["FLAMINGO_DATA_WORK"] = str(scratch / "work")
    env["MPLBACKEND"] = "Agg"
    return env


def run_block(block: Block, cwd: Path, scratch: Path) -> subprocess.CompletedProcess:
    """A bash block as a real bash script, a python block as a script, both in ``cwd``."""
    if block.lang == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        script = scratch / f"block_{block.line}.py"
        script.write_text(block.code)
        argv = [sys.executable, str(script)]
    env = _env(scratch)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _page_params() -> list:
    params = []
    for page in PAGES:
        name = page_name(page)
        runnable = [b for b in fenced_blocks(page) if b.lang in RUN_LANGS and b.tag != "notest"]
        if runnable:
            marks = [pytest.mark.slow] if name in SLOW_PAGES else []
            params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("page", _page_params())
def test_every_command_and_code_example_of_the_page_runs(
    page: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if page in REPOSITORY_PAGES:
        cwd = ROOT
    else:
        inputs, built = request.getfixturevalue("workspace")
        if DOWNLOADED & set(NEEDS.get(page, [])):
            built = request.getfixturevalue("downloads")
        cwd = tmp_path / "work"
        shutil.copytree(inputs, cwd, symlinks=True)
        for output in NEEDS.get(page, []):
            shutil.copytree(built / output, cwd / output)
    for block in fenced_blocks(ROOT / page):
        if block.lang not in RUN_LANGS or block.tag == "notest":
            continue
        result = run_block(block, cwd, scratch)
        assert result.returncode == 0, (
            f"{block_id(block)} exited {result.returncode}:\n{block.code}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )


# ---------------------------------------------------------------- blocks that are not run


def test_every_block_has_a_known_kind_and_every_unrun_block_is_allow_listed() -> None:
    unknown = [
        block_id(b)
        for b in ALL_BLOCKS
        if not (
            (b.lang in RUN_LANGS and b.tag in ("", "notest"))
            or (b.lang == "json" and b.tag in JSON_TAGS)
            or (b.lang == "text" and b.tag == "")
        )
    ]
    assert not unknown, f"fenced blocks of an unknown kind (bash, python, json, text): {unknown}"
    not_run = {(b.page, b.first_line) for b in ALL_BLOCKS if b.tag == "notest"}
    unlisted = not_run - NOT_RUN.keys()
    assert not unlisted, (
        f"blocks fenced notest but not in NOT_RUN (add them with a reason): {unlisted}"
    )
    stale = NOT_RUN.keys() - not_run
    assert not stale, f"NOT_RUN entries whose block is gone: {stale}"
    assert all(reason.strip() for reason in NOT_RUN.values())


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang == "json"], ids=block_id)
def test_json_examples_parse_and_pass_their_schema(block: Block) -> None:
    if block.tag == "jsonl":
        records = [json.loads(line) for line in block.code.splitlines() if line.strip()]
        assert records and all(isinstance(r, dict) for r in records)
        return
    record = json.loads(block.code)
    if block.tag:
        schema = json.loads((SCHEMAS / f"{block.tag}.schema.json").read_text())
        jsonschema.validate(record, schema)


# ---------------------------------------------------------------- the reason table


def reason_table() -> set[tuple[str, str]]:
    """(category, reason) rows of docs/reasons.md; ``&lt;x&gt;`` stands for ``<x>``."""
    rows = set()
    for line in (ROOT / "docs" / "reasons.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[0] not in ("category", "---"):
            rows.add((cells[0], cells[1].replace("&lt;", "<").replace("&gt;", ">")))
    return rows


CATEGORY_WORDS = {"documents", "images", "units", "rows", "samples", "members", "keys", "rejected"}
REASON_CALLS = {
    "reject",
    "Reject",
    "ItemError",
    "SequenceError",
    "DocumentError",
    "ReadIssue",
    "Failure",
    "ImageResult",
    "GptPlan",
    "Verdict",
}
KEYWORD_ONLY = {"ImageResult", "GptPlan"}  # their positional arguments are outcomes and data
REASON_SOURCES = [
    *sorted((ROOT / "converters").glob("*.py")),
    *(
        ROOT / "flamingo_data" / name
        for name in (
            "images/stage.py",
            "check/validate.py",
            "storage/shard_reader.py",
            "fetch/i2d_output.py",
            "check/inspect.py",
            "core/records.py",
        )
    ),
    *sorted((ROOT / "flamingo_data" / "loader").glob("*.py")),
]
SNAKE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")


def emitted_reasons(path: Path) -> set[str]:
    """Reason codes a module passes to the calls that reject, fail or skip (positional string
    arguments and ``reason=`` / ``rejected_reason=``), and the codes of img2dataset's message map."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in REASON_CALLS:
                continue
            positional = [] if name in KEYWORD_ONLY else node.args
            values = [*positional, *(k.value for k in node.keywords if "reason" in (k.arg or ""))]
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.add(value.value)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "REASON_CODES" for t in node.targets
        ):
            found |= {pair.elts[1].value for pair in node.value.elts}
    return {r for r in found if SNAKE.match(r) and r not in CATEGORY_WORDS and r != "rejected"}


def test_the_reason_table_lists_every_code_the_source_emits() -> None:
    documented = {reason for _, reason in reason_table()}
    missing = {
        f"{reason} ({path.relative_to(ROOT)})"
        for path in REASON_SOURCES
        for reason in emitted_reasons(path)
        if reason not in documented
    }
    assert not missing, f"reason codes emitted but not in docs/reasons.md: {sorted(missing)}"


def test_every_registered_code_is_in_the_reason_table() -> None:
    """flamingo_data.core.reasons and docs/reasons.md name the same codes (a row may list several,
    and ``image_<why>`` / ``layout_<layout>`` stand for the codes built from them)."""
    from flamingo_data.core.reasons import REASONS

    documented = {
        code.strip() for _, cell in reason_table() for code in cell.split(",") if code.strip()
    }
    patterns = {"image_<why>": "image_", "layout_<layout>": "layout_"}
    undocumented = sorted(
        f"{category}/{code}"
        for category, code in REASONS
        if code not in documented
        and not any(p in documented and code.startswith(s) for p, s in patterns.items())
    )
    assert not undocumented, f"registered but not in docs/reasons.md: {undocumented}"


def test_the_reason_table_has_one_meaning_per_row() -> None:
    text = (ROOT / "docs" / "reasons.md").read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line and not line.startswith("| category |")
    ]
    assert len(rows) == len(reason_table()), "a (category, reason) row is listed twice"


# ---------------------------------------------------------------- the files beside the shards


def output_file_table() -> list[tuple[str, str]]:
    """(file, written by) rows of the table in docs/formats.md's "Files beside the shards"."""
    text = (ROOT / "docs" / "formats.md").read_text()
    section = text.split("## Files beside the shards", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((cells[0], cells[1]))
    return rows


def test_the_table_of_files_beside_the_shards_is_output_files() -> None:
    """tests/converters/test_output_files.py holds every converter's output folder to
    OUTPUT_FILES, so the table that users read is that list, row for row."""
    assert output_file_table() == [(f"`{f.name}`", f.when) for f in OUTPUT_FILES]


# ---------------------------------------------------------------- no history in the guide or the code

DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
HISTORY = re.compile(
    r"\bused to\b|\bwas previously\b|\bno longer\b|\bsince 20\d\d|\bbefore 20\d\d|\buntil 20\d\d"
    r"|\(was |\bit was \b|(?:^|[.;:(]\s*)before, |\bformerly\b|\buntil recently\b|\bthe old (?:code|behaviour)\b"
    r"|\bthe default before\b|\bmade before\b|\bfrom before\b|\btoday\b"
    r"|\bcrashed\b|\bhung\b|\bwas silently\b|\bwere silently\b|\bwas exit\b|\bwere lost\b",
    re.I,
)


def history_hits(text: str) -> list[str]:
    return [m.group(0) for m in (*DATE.finditer(text), *HISTORY.finditer(text))]


GUIDE = [p for p in PAGES if p.name != "benchmarks.md"] + [ROOT / "docs" / "benchmarks.md"]


@pytest.mark.parametrize("page", GUIDE, ids=page_name)
def test_the_guide_states_the_contract_without_dates_or_history(page: Path) -> None:
    hits = [
        f"{page_name(page)}:{n}: {hit!r}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        for hit in history_hits(line)
    ]
    assert not hits, "history belongs in CHANGELOG.md:\n" + "\n".join(hits)


def comments_and_docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python module."""
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                for offset, line in enumerate(first.value.value.splitlines()):
                    yield first.lineno + offset, line


CODE = [
    *sorted((ROOT / "flamingo_data").rglob("*.py")),
    *sorted((ROOT / "converters").rglob("*.py")),
]


def test_comments_and_docstrings_state_the_contract_without_dates_or_history() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {hit!r}"
        for path in CODE
        for line, text in comments_and_docstrings(path)
        for hit in history_hits(text)
    ]
    assert not hits, "history belongs in the commit message and CHANGELOG.md:\n" + "\n".join(hits)
