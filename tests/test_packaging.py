"""The package installs as ``flamingo_data`` with converters/ and schemas/ inside it, editable or not."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
