"""One error policy (flamingo_data.errors + flamingo_data.cli.main.main) and the reason registry
(flamingo_data.core.reasons): every reason the source emits is registered, and nothing else is."""

from __future__ import annotations

import ast
import errno
import functools
import importlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import flamingo_data
from flamingo_data import errors
from flamingo_data.cli import main as cli
from flamingo_data.core.reasons import REASONS, reasons_table
from flamingo_data.demo.sample_data import make_image, write_mmc4_sample
from flamingo_data.run.executors import Execution

PACKAGE = Path(flamingo_data.__file__).parent
SOURCES = sorted(p for p in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "converters").glob("*.py")])
if (PACKAGE / "converters").is_dir():  # a normal install puts converters/ inside the package
    SOURCES = sorted(PACKAGE.rglob("*.py"))


# ---- the reason registry ----------------------------------------------------------------------

# Calls that emit a reason: callee name -> (category or None to take it from argument 0, the
# reason's position). ``reject`` is Stats.reject(category, reason) on a stats object and
# UnitContext.reject(category, key, reason) otherwise.
EMITTERS = {
    "Reject": ("loader", 0),
    "DocumentError": ("documents", 0),
    "ItemError": ("documents", 0),
    "SequenceError": ("documents", 0),
    "RecordEncodingError": ("documents", 0),
    "ReadIssue": ("members", 2),
    "Failure": ("validate", 2),
    "Dropped": ("loader_images", 1),
    "Verdict": ("samples", 0),
}


class ReasonScan:
    """String codes an expression can hold, followed through local names, module constants and
    the returns of functions of the same module (``reason = _tar_error_reason(...)``)."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.functions = {
            n.name: n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        self.parents = {
            child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
        }

    def scope_of(self, node: ast.AST) -> ast.AST:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return self.tree

    def codes(
        self, expr: ast.AST | None, scope: ast.AST, index: int | None = None, seen=None
    ) -> set[str]:
        seen = set() if seen is None else seen
        if expr is None or (id(expr), index) in seen:
            return set()
        seen.add((id(expr), index))
        if isinstance(expr, ast.Constant):  # "" stands for "no reason" (an image that was found)
            return (
                {expr.value}
                if isinstance(expr.value, str) and expr.value and index is None
                else set()
            )
        if isinstance(expr, ast.Tuple):
            if index is None or index >= len(expr.elts):
                return set()
            return self.codes(expr.elts[index], scope, None, seen)
        if isinstance(expr, ast.IfExp):
            return self.codes(expr.body, scope, index, seen) | self.codes(
                expr.orelse, scope, index, seen
            )
        if isinstance(expr, ast.BoolOp):
            return set().union(*(self.codes(v, scope, index, seen) for v in expr.values))
        if isinstance(expr, ast.Name):
            return self._name(expr.id, scope, index, seen)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            function = self.functions.get(expr.func.id)
            if function is None:
                return set()
            returns = [n for n in ast.walk(function) if isinstance(n, ast.Return)]
            return set().union(
                set(), *(self.codes(r.value, function, index, seen) for r in returns)
            )
        return set()

    def _name(self, name: str, scope: ast.AST, index: int | None, seen) -> set[str]:
        found: set[str] = set()
        for scope_node in (scope, self.tree) if scope is not self.tree else (self.tree,):
            nodes = (
                ast.walk(scope_node) if scope_node is scope else ast.iter_child_nodes(scope_node)
            )
            for node in nodes:
                if isinstance(node, ast.Assign):
                    pairs = [(t, node.value) for t in node.targets]
                elif isinstance(node, ast.NamedExpr | ast.AnnAssign) and node.value is not None:
                    pairs = [(node.target, node.value)]
                else:
                    continue
                for target, value in pairs:
                    if isinstance(target, ast.Name) and target.id == name:
                        found |= self.codes(value, scope_node, index, seen)
                    elif isinstance(target, ast.Tuple) and index is None:
                        for i, element in enumerate(target.elts):
                            if isinstance(element, ast.Name) and element.id == name:
                                found |= self.codes(value, scope_node, i, seen)
        if not found and index is None and name in _imported_constants():
            found.add(_imported_constants()[name])
        return found


@functools.cache
def _imported_constants() -> dict[str, str]:
    """Upper-case module-level string constants of every source (``NON_FINITE_AS_NULL = "..."``),
    which other modules import by name."""
    constants: dict[str, str] = {}
    for path in SOURCES:
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                constants.update(
                    (t.id, node.value.value)
                    for t in node.targets
                    if isinstance(t, ast.Name) and t.id.isupper()
                )
    return constants


def _emitted(tree: ast.Module, module: str) -> Iterator[tuple[str, str, int]]:
    """(category, code, line) for every reason this module emits as a resolvable string."""
    scan = ReasonScan(tree)
    for node in ast.walk(tree):
        scope = scan.scope_of(node)
        if isinstance(node, ast.Assign) and any(  # plan.rejected_reason = "no_images"
            isinstance(t, ast.Attribute) and t.attr == "rejected_reason" for t in node.targets
        ):
            yield from (("loader", c, node.lineno) for c in scan.codes(node.value, scope))
        if not isinstance(node, ast.Call):
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        receiver = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
        args = node.args
        category, position = None, None
        if name in EMITTERS:
            category, position = EMITTERS[name]
        elif name == "reject" and args and isinstance(args[0], ast.Constant):
            category, position = args[0].value, 1 if receiver.endswith("stats") else 2
        elif name == "add" and len(args) >= 2 and isinstance(args[0], ast.Constant):
            category, position = args[0].value, 1
        elif name == "append" and args and isinstance(args[0], ast.Tuple):
            first = args[0].elts[0] if args[0].elts else None
            if receiver == "problems" and isinstance(first, ast.Constant):
                yield ("validate", first.value, node.lineno)
            continue
        for keyword in node.keywords:
            if keyword.arg == "rejected_reason":
                yield from (("loader", c, node.lineno) for c in scan.codes(keyword.value, scope))
            rejected = args and isinstance(args[0], ast.Constant) and args[0].value == "rejected"
            if name == "ImageResult" and keyword.arg == "reason" and rejected:
                yield from (("images", c, node.lineno) for c in scan.codes(keyword.value, scope))
        if category is not None and position is not None and position < len(args):
            yield from ((category, c, node.lineno) for c in scan.codes(args[position], scope))
    for node in ast.walk(tree) if module == "validate.py" else ():
        # validate's per-sample checks return (reason, detail)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts:
            first = node.value.elts[0]
            function = scan.scope_of(node)
            if (
                isinstance(first, ast.Constant)
                and first.value
                and getattr(function, "name", "").startswith("_check")
            ):
                yield ("validate", first.value, node.lineno)


@functools.cache
def _all_emitted() -> list[tuple[str, str, str]]:
    found = []
    for path in SOURCES:
        for category, code, line in _emitted(ast.parse(path.read_text(), str(path)), path.name):
            found.append((category, code, f"{path.name}:{line}"))
    return found


@functools.cache
def _string_constants() -> set[str]:
    constants: set[str] = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
    return constants


def test_the_scan_finds_reasons_of_every_kind_of_emitter() -> None:
    """The scan itself is checked: one known reason per emitter pattern it must see."""
    found = {(category, code) for category, code, _ in _all_emitted()}
    expected = {
        ("documents", "bad_json"),  # DocumentError
        ("documents", "unknown_role"),  # ItemError
        ("documents", "placeholder_repeated"),  # SequenceError
        ("documents", "invalid_unicode"),  # RecordEncodingError via a local name
        ("documents", "line_too_long"),  # UnitContext.reject
        ("units", "truncated_zip"),  # reject with a conditional local name
        ("images", "no_url"),  # a tuple-unpacked local name
        ("images", "truncated"),  # ImageResult(reason=...)
        ("members", "not_a_tar"),  # ReadIssue through a helper's returns
        ("samples", "empty_caption"),  # Stats.reject through two helpers' returns
        ("rows", "dropped_by_img2dataset"),  # a module constant
        ("loader", "no_trainable_tokens"),  # Reject
        ("loader", "placeholder_without_image"),  # rejected_reason=
        ("loader_images", "below_threshold"),  # Dropped
        ("loader_images", "no_image_bytes"),  # Dropped through a helper
        ("validate", "count_mismatch"),  # Failure
        ("validate", "placeholder_numbering"),  # problems.append
        ("validate", "bad_base64"),  # a _check function's return
        ("values", "non_finite_as_null"),  # Stats.add
    }
    assert expected <= found, sorted(expected - found)


def test_every_emitted_reason_is_registered() -> None:
    unregistered = sorted(
        f"{where}: ({category!r}, {code!r})"
        for category, code, where in _all_emitted()
        if (category, code) not in REASONS
    )
    assert not unregistered, "register these in flamingo_data/core/reasons.py:\n" + "\n".join(
        unregistered
    )


def test_img2dataset_reason_codes_are_registered() -> None:
    from flamingo_data.fetch.i2d_output import REASON_CODES

    assert {("rows", code) for _, code in REASON_CODES} <= set(REASONS)
    assert {("images", code) for _, code in REASON_CODES} <= set(REASONS)  # chatgpt's joins


def test_nothing_registered_is_unused() -> None:
    """A registered code is emitted (found by the scan) or at least written in the source: as
    itself, or after a prefix the source builds codes with (``image_<reason>``, ``layout_<name>``)."""
    emitted = {(category, code) for category, code, _ in _all_emitted()}
    constants = _string_constants()
    unused = []
    for category, code in REASONS:
        if (category, code) in emitted or code in constants:
            continue
        prefix, _, rest = code.partition("_")
        if f"{prefix}_" in _fstring_prefixes() and rest in constants:
            continue
        unused.append((category, code))
    assert not unused, f"registered but never emitted: {sorted(unused)}"


@functools.cache
def _fstring_prefixes() -> set[str]:
    prefixes = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    prefixes.add(first.value)
    return prefixes


def test_reasons_table_is_one_markdown_row_per_reason() -> None:
    lines = reasons_table().splitlines()
    assert lines[:2] == ["| category | reason | meaning |", "| --- | --- | --- |"]
    rows = [line.split(" | ") for line in lines[2:]]
    assert len(rows) == len(REASONS)
    assert {(r[0].removeprefix("| "), r[1].strip("`")) for r in rows} == set(REASONS)
    assert all(r[2].removesuffix(" |").strip() and "\n" not in r[2] for r in rows)


def _convert_mmc4(sample: dict, out: Path) -> list[str]:
    docs, images = sample["docs"], sample["images"]
    options = ["--out", str(out), "--processes", "1", "--no-progress"]
    return ["convert", "mmc4", "--docs", docs, "--images", images, *options]


@pytest.mark.parametrize("variant", ["bad_lines", "cut_off_zip", "broken_images"])
def test_reasons_in_a_real_runs_stats_are_registered(tmp_path: Path, variant: str) -> None:
    """A converted sample with bad lines, a cut-off zip or broken images: every reason that
    lands in stats.json and rejects.jsonl is in the registry, under its category."""
    sample = write_mmc4_sample(tmp_path / "src", n_shards=2, docs_per_shard=4, missing_rate=0.3)
    zips = sorted((tmp_path / "src" / "docs").glob("*.zip"))
    if variant == "bad_lines":
        with zipfile.ZipFile(zips[0], "a") as z:
            z.writestr("extra.jsonl", '{"text_list": 3}\nnot json\n[1]\n{"text_list": []}\n')
    elif variant == "cut_off_zip":
        zips[1].write_bytes(zips[1].read_bytes()[:-40])
    else:
        for i, image in enumerate(sorted((tmp_path / "src" / "images").rglob("*.*"))):
            if i % 3 != 2:  # a third stay whole, so the run writes documents
                image.write_bytes(b"" if i % 3 == 0 else make_image(i, 8, 8, "PNG")[: 20 + i])
    out = tmp_path / "out"
    assert cli.main([*_convert_mmc4(sample, out), "--rejects"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    seen = {(c, r) for c, reasons in stats["reasons"].items() for r in reasons}
    seen |= {(c, o) for c, outcomes in stats["counts"].items() for o in outcomes if o != "rejected"}
    rejects = (out / "rejects.jsonl").read_text().splitlines()
    seen |= {(json.loads(line)["kind"], json.loads(line)["reason"]) for line in rejects}
    assert len(seen) > 4 and seen <= set(REASONS), sorted(seen - set(REASONS))


# ---- the error policy -------------------------------------------------------------------------


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


ERROR_CLASSES = sorted(set(_subclasses(errors.FlamingoDataError)), key=lambda c: c.__name__)


def _make(cls: type[errors.FlamingoDataError]) -> errors.FlamingoDataError:
    if cls is errors.MissingExtra:
        return cls("encoder 'jpegli'", "pyjpegli", "jpegli")
    return cls("the thing given\nis wrong")  # a message of two lines still prints as one


def test_the_hierarchy_carries_exit_codes_and_replaces_the_old_classes() -> None:
    from flamingo_data.check.validate import SizesFileError
    from flamingo_data.cli.options import UsageError
    from flamingo_data.converters.mmc4 import LayoutError
    from flamingo_data.run.procpool import WorkerDied
    from flamingo_data.run.units import OutputExistsError, RunIncomplete
    from flamingo_data.storage.remote import RemoteUnavailable
    from flamingo_data.storage.specs import SpecError
    from flamingo_data.train.config import StartError

    for cls in (UsageError, LayoutError, RemoteUnavailable, SpecError, StartError, SizesFileError):
        assert issubclass(cls, errors.InputError) and cls.exit_code == 2
    assert issubclass(OutputExistsError, errors.InputError) and OutputExistsError.exit_code == 2
    for cls in (WorkerDied, RunIncomplete):
        assert issubclass(cls, errors.RunError) and cls.exit_code == 1
    assert issubclass(errors.SettingsMismatch, errors.OutputExistsError)
    assert all(c.exit_code in (1, 2) for c in ERROR_CLASSES)
    # a missing extra crosses process boundaries (a worker raises it) whole
    import pickle

    again = pickle.loads(pickle.dumps(_make(errors.MissingExtra)))
    assert again.extra == "jpegli" and "pip install 'flamingo-data[jpegli]'" in str(again)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("policy")
    sample = write_mmc4_sample(folder / "src", n_shards=1, docs_per_shard=3, missing_rate=0.0)
    out = folder / "shards"
    assert cli.main(_convert_mmc4(sample, out)) == 0
    return out


# command -> (module attribute the command calls into, argv after the command name)
def _commands(shards: Path, tmp: Path) -> dict[str, tuple[str, list[str]]]:
    src = shards.parent / "src"
    return {
        "convert mmc4": (
            "flamingo_data.cli.convert_mmc4:convert_mmc4",
            ["--docs", str(src / "docs"), "--images", str(src / "images"), "--out", str(tmp / "o")],
        ),
        "convert conversations": (
            "flamingo_data.cli.convert_conversations:convert_conversations",
            ["--json", str(tmp / "c.json"), "--images", str(tmp), "--out", str(tmp / "o")],
        ),
        "convert chatgpt": (
            "flamingo_data.converters.chatgpt:convert_chatgpt",
            ["--sequences", str(tmp / "s.json"), "--out", str(tmp / "o")],
        ),
        "convert laion": (
            "flamingo_data.converters.laion:convert_laion",
            ["--parquet", str(tmp / "p.parquet"), "--out", str(tmp / "o")],
        ),
        "validate": ("flamingo_data.check.validate:validate_shards", [str(shards)]),
        "inspect": ("flamingo_data.check.inspect:inspect_shards", [str(shards)]),
        "preview": (
            "flamingo_data.check.preview:write_preview",
            [str(shards), "--out", str(tmp / "p.html")],
        ),
        "train": (
            "flamingo_data.train.trainer:train",
            ["--mmc4-shards", str(shards), "--run-dir", str(tmp / "run")],
        ),
    }


def _patch(monkeypatch: pytest.MonkeyPatch, target: str, exc: BaseException) -> None:
    module, name = target.split(":")

    def fails(*args, **kwargs):
        raise exc

    monkeypatch.setattr(importlib.import_module(module), name, fails)


COMMANDS = [
    "convert mmc4",
    "convert conversations",
    "convert chatgpt",
    "convert laion",
    "validate",
    "inspect",
    "preview",
    "train",
]


def _run(command: str, shards: Path, tmp: Path, monkeypatch, exc: BaseException) -> int:
    target, argv = _commands(shards, tmp)[command]
    _patch(monkeypatch, target, exc)
    return cli.main([*command.split(), *argv])


# Commands whose errors went through the removed usage_errors (train never did).
NOT_TRAIN = [c for c in COMMANDS if c != "train"]
# Commands that have no committed units to keep (the converters' advice was theirs too).
NOT_CONVERT = [c for c in COMMANDS if not c.startswith("convert")]


@pytest.mark.parametrize("command", NOT_TRAIN)
@pytest.mark.parametrize(
    "exc",
    [RuntimeError("torch broke"), NotImplementedError("a codec"), RecursionError("deep")],
    ids=lambda e: type(e).__name__,
)
def test_a_builtin_exception_is_a_bug_not_bad_input(
    command: str, exc: Exception, shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """An unexpected RuntimeError (from torch, PIL, ...) was reported as bad input, exit 2, with
    no traceback: it leaves main as it is, so Python prints its traceback and exits 1."""
    with pytest.raises(type(exc)) as raised:
        _run(command, shards, tmp_path, monkeypatch, exc)
    assert raised.value is exc
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "convert mmc4", "preview"])
def test_a_builtin_exception_gives_a_traceback_and_exit_1_in_a_real_process(
    command: str, shards: Path, tmp_path: Path
) -> None:
    target, argv = _commands(shards, tmp_path)[command]
    module, name = target.split(":")
    script = (
        "import importlib, sys\n"
        f"m = importlib.import_module({module!r})\n"
        "def fails(*a, **k):\n    raise RuntimeError('an unexpected failure inside torch')\n"
        f"setattr(m, {name!r}, fails)\n"
        "from flamingo_data.cli.main import main\n"
        f"sys.exit(main({[*command.split(), *argv]!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: an unexpected failure inside torch" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_error_class_is_one_line_and_its_exit_code(
    command: str, cls: type, shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    exc = _make(cls)
    assert _run(command, shards, tmp_path, monkeypatch, exc) == cls.exit_code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("flamingo-data: error: "), err
    assert " ".join(str(exc).split()) in err
    resumable = issubclass(cls, errors.RunError)
    if command.startswith("convert"):
        assert ("committed units are kept, rerun with --resume" in err) == resumable
    elif command == "train":
        assert "committed units" not in err
        assert ("checkpoints already saved are kept" in err) == resumable
    else:  # checks have nothing to resume
        assert "resume" not in err


@pytest.mark.parametrize("command", NOT_CONVERT)
@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.ENOENT, errno.EACCES], ids=errno.errorcode.get
)
def test_an_os_error_mid_run_is_one_line_exit_1_with_the_commands_advice(
    command: str, code: int, shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """validate, inspect and preview advised resuming a run they do not have, train spoke of
    committed units, and a FileNotFoundError from the library was exit 2 (usage_errors)."""
    failure = OSError(code, os.strerror(code), str(tmp_path / "x.tar"))
    assert _run(command, shards, tmp_path, monkeypatch, failure) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and os.strerror(code) in err and "x.tar" in err
    if command == "train":
        assert "checkpoints already saved are kept" in err and "committed units" not in err
    else:
        assert "resume" not in err


@pytest.mark.parametrize("command", NOT_CONVERT)
def test_ctrl_c_is_130_with_the_commands_advice(
    command: str, shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    assert _run(command, shards, tmp_path, monkeypatch, KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("flamingo-data: interrupted")
    assert "committed units" not in err
    assert ("checkpoints already saved" in err) == (command == "train")


NO_SHARDS = [
    "empty_folder",
    "folder_of_other_files",
    "glob_matching_nothing",
    "missing_tar",
    "braces",
]


def _no_shards(tmp_path: Path, variant: str) -> str:
    folder = tmp_path / "shards"
    folder.mkdir()
    if variant == "folder_of_other_files":
        (folder / "notes.txt").write_text("not a shard")
    return {
        "empty_folder": str(folder),
        "folder_of_other_files": str(folder),
        "glob_matching_nothing": str(folder / "*.tar"),
        "missing_tar": str(folder / "shard-00000.tar"),
        "braces": str(folder / "shard-{00000..00002}.tar"),
    }[variant]


@pytest.mark.parametrize("variant", NO_SHARDS)
def test_train_on_no_shards_is_one_line_exit_2_in_trainer_wording(
    tmp_path: Path, variant: str, capsys
) -> None:
    """An empty shard folder given to train was exit 1 with 'committed units are kept, fix it and
    rerun with --resume': converter advice, for a run that never began."""
    spec = _no_shards(tmp_path, variant)
    argv = ["train", "--mmc4-shards", spec, "--run-dir", str(tmp_path / "run"), "--steps", "1"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flamingo-data: error: "), lines
    assert f"--mmc4-shards {spec} names no shard" in lines[0] and "committed units" not in lines[0]


def test_train_on_an_empty_folder_in_a_real_process(tmp_path: Path) -> None:
    spec = _no_shards(tmp_path, "empty_folder")
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "train", "--mmc4-shards", spec]
        + ["--run-dir", str(tmp_path / "run"), "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "names no shard" in lines[0], result.stderr
    assert "committed units" not in result.stderr and "Traceback" not in result.stderr


def test_a_missing_extra_is_exit_2_naming_the_extra(
    shards: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Real import failures: matplotlib hidden for --plot, transformers for --tokenizer, pyjpegli
    for --encoder jpegli, and Ray (when not installed) for --executor ray."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert cli.main(["inspect", str(shards), "--plot", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install 'flamingo-data[plot]'" in err
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["inspect", str(shards), "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install 'flamingo-data[hf]'" in err
    monkeypatch.setitem(sys.modules, "pyjpegli", None)
    src = shards.parent / "src"
    base = ["convert", "mmc4", "--docs", str(src / "docs"), "--images", str(src / "images")]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--encoder", "jpegli"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install 'flamingo-data[jpegli]'" in err
    assert "resume" not in err
    if importlib.util.find_spec("ray") is None:
        assert cli.main([*base, "--out", str(tmp_path / "b"), "--executor", "ray"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "pip install 'flamingo-data[ray]'" in err


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("images", "quality must be 1..100"),
        ("encoder", "encoder must be one of"),
        ("tables", "jpeg_tables must be one of"),
        ("layout", "layout must be one of auto, indexed, flat"),
        ("as_", "as_ must be interleaved or gpt"),
        ("executor", "executor must be one of local, ray, spark, not 'dask'"),
        ("weight", "weight must be a finite number above 0"),
    ],
)
def test_library_input_errors_are_typed_and_name_parameters(
    call: str, message: str, tmp_path: Path
) -> None:
    from flamingo_data.converters.conversations import ConversationOptions
    from flamingo_data.converters.mmc4 import Mmc4Options, convert_mmc4
    from flamingo_data.images.stage import ImagePolicy
    from flamingo_data.loader import DatasetSpec
    from flamingo_data.run.units import RunOptions

    calls = {
        "images": lambda: ImagePolicy(quality=0),
        "encoder": lambda: ImagePolicy(encoder="mozjpeg"),
        "tables": lambda: ImagePolicy(jpeg_tables="nope"),
        "layout": lambda: convert_mmc4(
            [str(tmp_path)],
            Mmc4Options(images=str(tmp_path), layout="nested"),
            RunOptions(out_dir=str(tmp_path / "o"), converter="mmc4"),
        ),
        "as_": lambda: ConversationOptions(images=str(tmp_path), as_="chat"),
        "executor": lambda: Execution(executor="dask"),
        "weight": lambda: DatasetSpec("a", str(tmp_path), weight=0.0),
    }
    with pytest.raises(errors.InputError, match=message) as raised:
        calls[call]()
    assert "--" not in str(raised.value)


def test_a_library_message_names_parameters_and_the_command_line_shows_flags(
    tmp_path: Path, capsys
) -> None:
    """The library says `resume`, `overwrite`; the CLI prints the flags of the command that ran."""
    from flamingo_data import Mmc4Options, RunOptions, convert_mmc4

    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=2, missing_rate=0.0)
    argv = ["convert", "mmc4", "--docs", sample["docs"], "--images", sample["images"]]
    argv += ["--out", str(tmp_path / "out"), "--processes", "1", "--no-progress"]
    assert cli.main(argv) == 0
    with pytest.raises(errors.OutputExistsError, match="pass `resume` or `overwrite`"):
        convert_mmc4(
            sample["docs"],
            Mmc4Options(images=sample["images"]),
            RunOptions(out_dir=str(tmp_path / "out"), converter="mmc4"),
        )
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.rstrip().endswith("pass --resume or --overwrite")
    assert errors.with_flags("`batch_size` and `other`", {"batch_size": "--batch-size"}) == (
        "--batch-size and `other`"
    )
