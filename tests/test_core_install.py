"""The core install (no extras) runs every command that needs no extra; a command that needs one
refuses in one line naming it, exit 2, before writing anything; start-up imports only what the
command uses; ``flamingo_data`` exports its public API lazily."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import flamingo_data
from flamingo_data.cli.main import main as cli
from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.run.executors import Execution
from flamingo_data.run.units import RunOptions
from tests.test_upstream_compat import write_img2dataset_output

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "pyarrow", "img2dataset", "transformers", "matplotlib", "zstandard")
PUBLIC = {
    "convert_mmc4": "flamingo_data.converters.mmc4",
    "Mmc4Options": "flamingo_data.converters.mmc4",
    "convert_laion": "flamingo_data.converters.laion",
    "LaionOptions": "flamingo_data.converters.laion",
    "convert_chatgpt": "flamingo_data.converters.chatgpt",
    "ChatGptOptions": "flamingo_data.converters.chatgpt",
    "convert_conversations": "flamingo_data.converters.conversations",
    "ConversationOptions": "flamingo_data.converters.conversations",
    "convert_obelics": "flamingo_data.converters.obelics",
    "ObelicsOptions": "flamingo_data.converters.obelics",
    "UrlImages": "flamingo_data.fetch.url_images",
    "RunOptions": "flamingo_data.run.units",
    "Execution": "flamingo_data.run.executors",
    "DownloadOptions": "flamingo_data.fetch.i2d_run",
    "ImagePolicy": "flamingo_data.images.stage",
    "validate_shards": "flamingo_data.check.validate",
    "ValidateOptions": "flamingo_data.check.validate",
    "inspect_shards": "flamingo_data.check.inspect",
    "write_preview": "flamingo_data.check.preview",
    "build_loader": "flamingo_data.loader.pipeline",
    "LoaderConfig": "flamingo_data.loader.config",
    "DatasetSpec": "flamingo_data.loader.config",
    "make_tokenizer": "flamingo_data.loader.tokenizer",
    "build_flamingo": "flamingo_data.model.build",
    "FlamingoConfig": "flamingo_data.model.flamingo",
    "model_config": "flamingo_data.model.openflamingo",
    "load_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
    "save_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
    "export_openflamingo": "flamingo_data.train.export",
    "run_demo": "flamingo_data.demo.run",
    "FlamingoDataError": "flamingo_data.errors",
    "InputError": "flamingo_data.errors",
    "RunError": "flamingo_data.errors",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small converted MMC4 dataset (two shards + sizes.json)."""
    root = tmp_path_factory.mktemp("core")
    sample = write_mmc4_sample(root / "src", n_shards=2, docs_per_shard=5, missing_rate=0.0)
    out = root / "shards"
    convert_mmc4(
        sample["docs"],
        Mmc4Options(images=sample["images"]),
        RunOptions(out_dir=str(out), converter="mmc4"),
        execution=Execution(processes=1, progress=False),
    )
    return out


# ``python -X importtime -m flamingo_data ARGV``, printing sys.modules at exit: importtime does not
# list a module imported through importlib.import_module, only what that module imports
_RUN_MAIN = (
    "import atexit, json, runpy, sys\n"
    "atexit.register(lambda: print('modules:', json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
    "sys.argv = ['flamingo-data', *json.loads(sys.argv[1])]\n"
    "runpy.run_module('flamingo_data', run_name='__main__', alter_sys=True)\n"
)


def imported_modules(argv: list[str], cwd: Path) -> set[str]:
    """Every module ``python -X importtime -m flamingo_data ARGV`` imported (it must succeed)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _RUN_MAIN, json.dumps(argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    timed = [line for line in lines if line.startswith("import time:")][1:]  # [0]: the header
    at_exit = json.loads(lines[-1].removeprefix("modules: "))
    return {line.rsplit("|", 1)[1].strip() for line in timed} | set(at_exit)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["validate", "{shard}"],
        ["validate", "{folder}", "--deep"],
        ["validate", "{folder}", "--json", "-"],
        ["inspect", "{folder}"],
        ["inspect", "{shard}", "--json"],
        ["preview", "{folder}", "--out", "{tmp}/preview.html"],
        ["convert", "mmc4", "--help"],
        ["convert", "conversations", "--help"],
        ["convert", "laion", "--help"],
        ["convert", "chatgpt", "--help"],
        ["convert", "obelics", "--help"],
        ["demo", "--help"],
        ["train", "--help"],
    ],
    ids=lambda argv: " ".join(argv).replace("{", "").replace("}", ""),
)
def test_start_up_imports_no_heavy_or_optional_package(
    argv: list[str], shards: Path, tmp_path: Path
) -> None:
    shard = sorted(shards.glob("*.tar"))[0]
    filled = [a.format(shard=shard, folder=shards, tmp=tmp_path) for a in argv]
    modules = imported_modules(filled, tmp_path)
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"{' '.join(argv)} imported {heavy[:5]}"


@pytest.mark.parametrize(
    "argv, own_module",
    [
        (["--help"], None),
        (["--version"], None),
        (["convert", "--help"], None),
        (["validate", "--help"], "flamingo_data.cli.validate"),
        (["inspect", "--help"], "flamingo_data.cli.inspect"),
        (["convert", "mmc4", "--help"], "flamingo_data.cli.convert_mmc4"),
        (["convert", "laion", "--help"], "flamingo_data.cli.convert_laion"),
    ],
)
def test_only_the_chosen_command_module_is_imported(
    argv: list[str], own_module: str | None, tmp_path: Path
) -> None:
    modules = imported_modules(argv, tmp_path)
    ours = {m for m in modules if m.split(".")[0] == "flamingo_data"}
    if own_module is None:  # the bare parser holds help texts only
        assert ours == {
            "flamingo_data",
            "flamingo_data.cli",
            "flamingo_data.cli.main",
            "flamingo_data.errors",
            "flamingo_data.core",
            "flamingo_data.core.extras",
        }
        return
    commands = {m for m in ours if m.startswith("flamingo_data.cli.")} - {"flamingo_data.cli.main"}
    # the chosen command's module and the options every command shares
    assert commands == {own_module, "flamingo_data.cli.options"}


def test_version_option_prints_the_installed_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0
    version = importlib.metadata.version("flamingo-data")
    assert (
        capsys.readouterr().out.strip()
        == f"flamingo-data {version}"
        == (f"flamingo-data {flamingo_data.__version__}")
    )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_resolves_to_its_defining_module(name: str) -> None:
    value = getattr(flamingo_data, name)
    assert value is getattr(importlib.import_module(PUBLIC[name]), name)
    assert name in flamingo_data.__all__ and name in dir(flamingo_data)


def test_public_api_is_listed_and_unknown_names_are_attribute_errors() -> None:
    assert set(flamingo_data.__all__) == {*PUBLIC, "__version__"}
    assert set(flamingo_data.__all__) <= set(dir(flamingo_data))
    with pytest.raises(AttributeError, match="no attribute 'convert_nothing'"):
        flamingo_data.convert_nothing  # noqa: B018
    namespace: dict = {}
    exec("from flamingo_data import *", namespace)
    assert {*PUBLIC, "__version__"} <= set(namespace)


@pytest.mark.parametrize(
    "package, torch_free_names",
    [
        ("flamingo_data", ("LoaderConfig", "DatasetSpec")),
        ("flamingo_data.loader", ("LoaderConfig", "DatasetSpec", "make_tokenizer")),
        ("flamingo_data.model", ()),
    ],
)
def test_a_package_and_its_torch_free_names_import_nothing_heavy(
    package: str, torch_free_names: tuple[str, ...], tmp_path: Path
) -> None:
    uses = "".join(f"{package}.{name}; " for name in torch_free_names)
    code = (
        f"import sys, {package}; {uses}"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, extra",
    [
        ("flamingo_data.build_loader", "train"),
        ("flamingo_data.build_flamingo", "train"),
        ("flamingo_data.FlamingoConfig", "train"),
        ("flamingo_data.loader.build_loader", "train"),
        ("flamingo_data.model.build_flamingo", "train"),
    ],
)
def test_a_public_name_whose_extra_is_missing_names_the_extra(
    name: str, extra: str, tmp_path: Path
) -> None:
    """Simulates a core install: ``sys.modules[...] = None`` is what a missing package looks like."""
    package, attr = name.rsplit(".", 1)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"import {package}\n"
        "from flamingo_data.core.extras import MissingExtra\n"
        f"try:\n    {package}.{attr}\nexcept MissingExtra as exc:\n    print(exc)\n"
        f"print({package}.LoaderConfig.__name__ if hasattr({package}, 'LoaderConfig') else '-')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    message, torch_free = result.stdout.strip().splitlines()
    assert message == (
        f"{name} needs the [{extra}] extra (torch): pip install 'flamingo-data[{extra}]'"
    )
    assert torch_free in ("LoaderConfig", "-")  # the torch-free names still resolve


def _missing_extra_cases() -> Iterator:
    """(argv with {out} {src} {shards}, module made missing, extra named, files that must not appear)."""
    yield pytest.param(
        ["convert", "laion", "--parquet", "{src}/urls.parquet", "--out", "{out}"],
        "img2dataset",
        "download",
        id="laion-parquet",
    )
    yield pytest.param(
        ["convert", "laion", "--parquet", "{src}/urls.parquet", "--out", "{out}", "--resume"],
        "img2dataset",
        "download",
        id="laion-parquet-resume",
    )
    yield pytest.param(
        ["convert", "chatgpt", "--sequences", "{src}/seqs.jsonl", "--out", "{out}"],
        "img2dataset",
        "download",
        id="chatgpt",
    )
    yield pytest.param(
        ["convert", "obelics", "--docs", "{src}/seqs.jsonl", "--images", "{src}/i2d"]
        + ["--download-images", "--out", "{out}"],
        "img2dataset",
        "download",
        id="obelics-download",
    )
    yield pytest.param(["demo", "--out", "{out}"], "torch", "train", id="demo")
    yield pytest.param(
        ["demo", "--out", "{out}", "--steps", "2", "--seed", "3"], "torch", "train", id="demo-opts"
    )
    yield pytest.param(
        ["train", "--mmc4-shards", "{shards}", "--run-dir", "{out}"], "torch", "train", id="train"
    )
    yield pytest.param(
        ["inspect", "{shards}", "--plot", "{out}"], "matplotlib", "plot", id="inspect-plot"
    )
    yield pytest.param(
        ["inspect", "{shards}", "--tokenizer", "{src}"], "transformers", "hf", id="inspect-hf"
    )
    mmc4 = ["convert", "mmc4", "--docs", "{src}/docs", "--images", "{src}/images"]
    yield pytest.param([*mmc4, "--out", "{out}", "--executor", "ray"], "ray", "ray", id="mmc4-ray")
    yield pytest.param(
        [*mmc4, "--out", "{out}", "--executor", "spark"], "pyspark", "spark", id="mmc4-spark"
    )
    yield pytest.param(
        [*mmc4, "--out", "{out}", "--encoder", "jpegli"], "pyjpegli", "jpegli", id="mmc4-jpegli"
    )


@pytest.mark.parametrize("argv, module, extra", list(_missing_extra_cases()))
def test_a_command_needing_a_missing_extra_refuses_before_writing(
    argv: list[str],
    module: str,
    extra: str,
    shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    src = tmp_path / "src"
    sample = write_mmc4_sample(src, n_shards=1, docs_per_shard=3, missing_rate=0.0)
    assert Path(sample["images"]) == src / "images"
    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a"]}).to_parquet(
        src / "urls.parquet"
    )
    (src / "seqs.jsonl").write_text(
        json.dumps({"example": "A _!_IMAGE1_!_ b", "image_map": {"_!_IMAGE1_!_": {"url": "x"}}})
    )
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = cli([a.format(src=src, out=out, shards=shards) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    assert captured.err.count("\n") == 1, captured.err[-2000:]
    assert f"needs the [{extra}] extra" in captured.err
    assert f"pip install 'flamingo-data[{extra}]'" in captured.err
    assert captured.out == ""  # refused before any work
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_library_download_calls_refuse_without_the_download_extra_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flamingo_data.converters.chatgpt import ChatGptOptions, convert_chatgpt
    from flamingo_data.converters.laion import LaionOptions, convert_laion
    from flamingo_data.core.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "img2dataset", None)
    parquet = tmp_path / "urls.parquet"
    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a"]}).to_parquet(parquet)
    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text(json.dumps({"example": "_!_IMAGE1_!_", "image_map": {"_!_IMAGE1_!_": {}}}))
    with pytest.raises(MissingExtra, match=r"convert_laion without from_img2dataset needs"):
        convert_laion(
            str(parquet),
            LaionOptions(),
            RunOptions(out_dir=str(tmp_path / "laion"), converter="laion"),
        )
    run = RunOptions(out_dir=str(tmp_path / "chatgpt"), converter="chatgpt")
    with pytest.raises(MissingExtra, match=r"convert_chatgpt without options.images_from needs"):
        convert_chatgpt(str(seqs), ChatGptOptions(), run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seqs.jsonl", "urls.parquet"]
    empty = tmp_path / "no-download"  # nothing to download: refused, but never for the extra
    empty.mkdir()
    with pytest.raises(Exception, match="no finished img2dataset shard") as caught:
        convert_laion(
            None,
            LaionOptions(),
            RunOptions(out_dir=str(tmp_path / "adopted"), converter="laion"),
            from_img2dataset=str(empty),
        )
    assert not isinstance(caught.value, MissingExtra)


def test_run_demo_with_training_refuses_without_torch_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flamingo_data.core.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtra, match=r"run_demo\(train=True\) needs the \[train\] extra"):
        flamingo_data.run_demo(tmp_path / "demo", steps=2)
    assert not (tmp_path / "demo").exists()


# ---- a real core install: a fresh venv with ``pip install <repo>``, no extras ----------------


def _source_copy(dest: Path) -> Path:
    """The repository's sources without build output, so pip builds nothing inside the checkout."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests"
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding flamingo-data without extras (pip uses this machine's index)."""
    root = tmp_path_factory.mktemp("core-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
        + [str(_source_copy(root / "src"))],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


def _run(bin_dir: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(bin_dir / "flamingo-data"), *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _write_conversations(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(make_image(1, 64, 48))
    (images / "b.png").write_bytes(make_image(2, 48, 64, fmt="PNG"))
    items = [
        {
            "id": f"item{i}",
            "image": ["a.jpg", "b.png"][i % 2],
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                {"from": "gpt", "value": "A generated pattern."},
            ],
        }
        for i in range(6)
    ]
    (root / "items.json").write_text(json.dumps(items))
    return root / "items.json", images


@pytest.mark.slow
def test_core_install_runs_every_command_that_needs_no_extra(
    core_venv: Path, tmp_path: Path
) -> None:
    python = core_venv / "python"
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0, "the core install must not bring torch"
    for module in ("img2dataset", "transformers", "matplotlib"):
        found = subprocess.run(
            [str(python), "-c", f"import importlib.util as u; print(u.find_spec({module!r}))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert found.stdout.strip() == "None", f"{module} is installed without its extra"

    def ok(argv: list[str]) -> str:
        result = _run(core_venv, argv, tmp_path)
        assert result.returncode == 0, f"{argv}: {result.stderr[-2000:]}"
        return result.stdout

    assert ok(["--version"]).strip() == f"flamingo-data {flamingo_data.__version__}"
    assert "convert" in ok(["--help"])
    for argv in (
        ["convert", name, "--help"] for name in ("mmc4", "laion", "chatgpt", "conversations")
    ):
        assert "--out" in ok(argv)
    for command in ("validate", "inspect", "preview", "demo", "train"):
        assert "usage: flamingo-data" in ok([command, "--help"])

    sample = write_mmc4_sample(tmp_path / "mmc4", n_shards=2, docs_per_shard=4, missing_rate=0.0)
    mmc4 = tmp_path / "mmc4-shards"
    ok(
        ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
        + ["--out", str(mmc4), "--processes", "1", "--no-progress", "--short-side", "32"]
    )
    items, images = _write_conversations(tmp_path / "conv")
    conv = tmp_path / "conv-shards"
    ok(
        ["convert", "conversations", "--json", str(items), "--images", str(images)]
        + ["--out", str(conv), "--processes", "1", "--no-progress"]
    )
    # the url-based converters without a download: an img2dataset output made beforehand
    i2d = tmp_path / "i2d"
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(4)]
    write_img2dataset_output(
        i2d, [(u, f"cap {i}", make_image(i, 40, 30), "jpg") for i, u in enumerate(urls)]
    )
    laion = tmp_path / "laion-shards"
    ok(["convert", "laion", "--from-img2dataset", str(i2d), "--out", str(laion), "--no-progress"])
    sequences = tmp_path / "seq.json"
    example = {
        "example": "a _!_IMAGE1_!_ b _!_IMAGE2_!_",
        "image_map": {"_!_IMAGE1_!_": {"url": urls[0]}, "_!_IMAGE2_!_": {"url": urls[1]}},
    }
    sequences.write_text(json.dumps([example]))
    gpt = tmp_path / "gpt-shards"
    ok(
        ["convert", "chatgpt", "--sequences", str(sequences), "--images-from", str(i2d)]
        + ["--out", str(gpt), "--processes", "1", "--no-progress"]
    )
    for out in (laion, gpt):
        assert "OK: fit for training" in ok(["validate", str(out), "--deep"])
    for out, documents in ((mmc4, 8), (conv, 6)):
        assert "OK: fit for training" in ok(["validate", str(out), "--deep"])
        report = json.loads(ok(["inspect", str(out), "--json"]))
        assert report["documents"] == documents
        ok(["preview", str(out), "--out", str(out / "preview.html")])
        assert "data:image/" in (out / "preview.html").read_text()

    demo = ok(["demo", "--no-train", "--out", str(tmp_path / "demo")])
    assert "validate                     OK" in demo
    assert (tmp_path / "demo" / "preview.html").exists()
    assert (tmp_path / "demo" / "inspect.json").exists()

    parquet = tmp_path / "urls.parquet"
    pd.DataFrame({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a"]}).to_parquet(parquet)
    refusals = [
        (["convert", "laion", "--parquet", str(parquet), "--out", "{out}"], "download"),
        (["demo", "--out", "{out}"], "train"),
        (["train", "--mmc4-shards", str(mmc4), "--run-dir", "{out}"], "train"),
        (["inspect", str(mmc4), "--plot", "{out}"], "plot"),
    ]
    for i, (argv, extra) in enumerate(refusals):
        out = tmp_path / f"refused-{i}"
        result = _run(core_venv, [a.format(out=out) for a in argv], tmp_path)
        assert result.returncode == 2, f"{argv}: {result.stderr[-2000:]}"
        (line,) = result.stderr.splitlines()
        assert line.startswith("flamingo-data: error: ") and f"needs the [{extra}] extra" in line
        assert line.endswith(f"pip install 'flamingo-data[{extra}]'")
        assert not out.exists() and result.stdout == ""

    api = subprocess.run(
        [
            str(python),
            "-c",
            "import flamingo_data as f; print(f.convert_mmc4.__name__); f.build_loader",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert api.stdout.strip() == "convert_mmc4"
    assert "MissingExtra: flamingo_data.build_loader needs the [train] extra" in api.stderr
