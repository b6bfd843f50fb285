"""``--help`` teaches: every option of every subcommand says what it does and, when it has one,
its default; the top-level help is plain text."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from flamingo_data.cli.main import DefaultsHelpFormatter, build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by its command line (``convert mmc4``, ``validate``, ...)."""
    found = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*words, name))
        found[" ".join(words)] = parser

    walk(build_parser(None), ())
    return found


SUBCOMMANDS = subcommands()


@pytest.mark.parametrize("command", sorted(c for c in SUBCOMMANDS if c))
def test_every_option_says_what_it_does_and_its_default(command: str) -> None:
    parser = SUBCOMMANDS[command]
    formatter = DefaultsHelpFormatter(prog="x")
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        text = formatter._get_help_string(action) or ""
        assert text.strip(), f"{command} {action.option_strings[-1]} has no help"
        meaningful = action.default not in (None, False, "", argparse.SUPPRESS, [])
        if meaningful:
            assert "default" in text, f"{command} {action.option_strings[-1]} hides its default"


def test_the_help_pages_render_plain_text() -> None:
    for command in ("", "convert", "convert laion", "train", "validate"):
        argv = [*command.split(), "--help"]
        result = subprocess.run(
            [sys.executable, "-m", "flamingo_data", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and "(default: None)" not in result.stdout
    laion = subprocess.run(
        [sys.executable, "-m", "flamingo_data", "convert", "laion", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "(default: 256 unless --short-side is given)" in " ".join(laion.split())


@pytest.mark.parametrize("what", ["file", "nothing"])
def test_an_image_folder_that_is_a_file_says_so(tmp_path, capsys, what: str) -> None:
    from flamingo_data.cli.main import main
    from flamingo_data.demo.sample_data import write_mmc4_sample

    sample = write_mmc4_sample(tmp_path / "src", n_shards=1, docs_per_shard=1)
    images = tmp_path / "images.tar"
    if what == "file":
        images.write_bytes(b"x")
    argv = ["convert", "mmc4", "--docs", sample["docs"], "--images", str(images)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    said = "is a file, not a folder" if what == "file" else "does not exist"
    assert capsys.readouterr().err.strip().endswith(f"--images {images} {said}")
