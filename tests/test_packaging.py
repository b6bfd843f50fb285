"""The package installs as ``flamingo_data`` with converters/ and schemas/ inside it, editable or not."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("flamingo_data-*.whl"))


def test_wheel_ships_converters_and_schemas_inside_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "flamingo_data/converters/mmc4.py" in names
    assert "flamingo_data/schemas/interleaved.schema.json" in names
    assert "flamingo_data/assets/chelsea.jpg" in names
    top_level = {n.split("/")[0] for n in names if not n.startswith("flamingo_data-")}
    assert top_level == {"flamingo_data"}, (
        f"generic top-level names leak into site-packages: {top_level}"
    )


@pytest.mark.slow
def test_regular_install_imports_and_loads_schemas(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import flamingo_data, flamingo_data.converters.mmc4 as m; from flamingo_data.core.schema import validator;"
        "[validator(k) for k in ('interleaved','gpt','pair','sizes','stats')];"
        "print(flamingo_data.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert result.stdout.strip().startswith(str(target))


def test_editable_install_imports_from_the_checkout() -> None:
    code = "import flamingo_data.converters, flamingo_data.schemas; print(flamingo_data.converters.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert Path(result.stdout.strip()) == ROOT / "converters" / "__init__.py"


def _core_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def _next_releases(installed: str) -> list[Version]:
    """The next major and minor releases after the installed one: where a cap would bite."""
    major, minor = Version(installed).release[:2]
    return [Version(f"{major + 1}.0"), Version(f"{major}.{minor + 1}")]


def _core_closure() -> set[str]:
    """Every distribution the core install pulls in (no extras): their own caps already bind the
    core resolution, so only packages outside it can swap a core choice."""
    names, todo = set(), [r.name for r in _core_requirements()]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in names:
            continue
        names.add(name)
        for text in metadata.requires(name) or []:
            other = Requirement(text)
            if other.marker is None or other.marker.evaluate({"extra": ""}):
                todo.append(other.name)
    return names


@pytest.mark.parametrize("requirement", _core_requirements(), ids=lambda r: r.name)
def test_core_pins_admit_nothing_an_installed_package_refuses(requirement: Requirement) -> None:
    """The core install must not choose a version that installing an extra (``[dev]``'s
    img2dataset, transformers, ...) would then swap out: the demo and the tests run on the same
    versions. Every release the core admits past the installed one must be admitted by every
    installed package that requires the same distribution."""
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True)
    core = _core_closure()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in core:
            continue
        for text in dist.requires or []:
            other = Requirement(text)
            if canonicalize_name(other.name) != canonicalize_name(requirement.name):
                continue
            if other.marker is not None and not other.marker.evaluate({"extra": ""}):
                continue
            for release in _next_releases(installed):
                if requirement.specifier.contains(release):
                    assert other.specifier.contains(release), (
                        f"core pin {requirement} admits {release}, which "
                        f"{dist.metadata['Name']} refuses ({other}): cap the core pin"
                    )
