"""The package tree is the architecture: pipeline folders, small folders, layers that only look down."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flamingo_data"
# Each folder's place in the pipeline: a module may import its own folder and folders of a lower rank only.
RANKS = {
    "errors": 0,
    "core": 1,
    "storage": 2,
    "images": 3,
    "run": 4,
    "fetch": 5,
    "converters": 6,
    "loader": 6,
    "check": 7,
    "model": 7,
    "train": 8,
    "demo": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 11,
}
# Folders whose size follows from something else than one job per module.
FOLDER_SIZE_EXCEPTIONS = {
    "cli": "one module per subcommand",
    "loader": "one module per loader stage",
    "model": "one module per model part",
}


def source_files() -> dict[str, Path]:
    """Dotted module name -> file, for the package and its installed ``converters`` folder."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(p for p in parts if p != "__init__") or "flamingo_data"] = path
    for path in sorted((ROOT / "converters").glob("*.py")):
        name = "flamingo_data.converters" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def folder_of(module: str) -> str:
    """The module's layer: its folder, or ``__main__`` for an entry point (``python -m``)."""
    if module.endswith(".__main__"):
        return "__main__"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_top_level_reads_in_one_look() -> None:
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name not in {"__pycache__", "assets"})
    assert len(entries) <= 15, entries
    loose = [e for e in entries if e.endswith(".py")]
    assert set(loose) <= {"__init__.py", "__main__.py", "errors.py"}, loose


def test_each_folder_holds_two_to_six_modules() -> None:
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if folder.name in FOLDER_SIZE_EXCEPTIONS:
            continue
        assert 2 <= len(modules) <= 6, (folder.name, sorted(m.name for m in modules))


def test_layers_only_import_downwards() -> None:
    wrong = []
    for module, imported in import_graph().items():
        here = folder_of(module)
        for target in imported:
            there = folder_of(target)
            if there == here or target in {"flamingo_data"}:
                continue
            if RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_loose_module_serves_a_single_importer() -> None:
    """A module at the top of the package is shared by several folders; one used by a single
    module belongs in that module's folder."""
    graph = import_graph()
    for path in PACKAGE.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        name = f"flamingo_data.{path.stem}"
        importers = {module for module, imported in graph.items() if name in imported}
        assert len(importers) >= 2, (name, sorted(importers))
