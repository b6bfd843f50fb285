"""The README's first command: the demo runs the whole product offline and leaves every artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_data.cli import main as cli


def test_demo_builds_converts_validates_previews_and_trains(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "demo", "--out", str(out), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validate                     OK" in result.stdout
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == json.loads((out / "inspect.json").read_text())["documents"] > 0
    assert "data:image/jpeg;base64," in (out / "preview.html").read_text()
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step_0000004"


def test_demo_into_a_folder_it_cannot_create_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["demo", "--out", str(blocker / "demo"), "--no-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("flamingo-data: error: cannot create output folder")
        and "--resume" not in err
    )
