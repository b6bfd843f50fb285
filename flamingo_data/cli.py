"""The ``flamingo-data`` console script: a thin shell over the library.

Each subcommand lives in ``flamingo_data.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; the module builds a config and calls the library function of the same name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from flamingo_data.errors import FlamingoDataError, RunError

COMMANDS = {
    "validate": "Check shards are fit for training; write sizes.json",
    "inspect": "Summarise a dataset: counts, histograms, what the loader would keep",
    "preview": "Render documents as HTML, the way the loader will see them",
    "train": "Train a Flamingo model on shards (run under torchrun for several processes)",
    "demo": "Build a small sample, convert, validate, preview and train a tiny model (no network)",
}
CONVERTERS = {
    "mmc4": "MMC4 zips + downloaded images -> interleaved shards",
    "laion": "LAION-style parquet -> image-text pair shards (downloads with img2dataset)",
    "chatgpt": "ChatGPT-generated sequences -> GPT shards with embedded images",
    "conversations": "LLaVA-style conversation JSON + image folder -> interleaved or GPT shards",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flamingo-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="Convert a source format into WebDataset shards")
    convert_sub = convert.add_subparsers(dest="source", required=True)
    for name, help_text in CONVERTERS.items():
        _add(convert_sub, name, help_text, f"flamingo_data.commands.convert_{name}")
    for name, help_text in COMMANDS.items():
        _add(sub, name, help_text, f"flamingo_data.commands.{name}")
    return parser


def _add(sub: argparse._SubParsersAction, name: str, help_text: str, module_name: str) -> None:
    if importlib.util.find_spec(module_name) is None:
        return
    module = importlib.import_module(module_name)
    parser = sub.add_parser(name, help=help_text, description=help_text)
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def _train_handler():
    from flamingo_data.commands.train import run

    return run


# What survives a run that stopped, by the command that ran it ({} takes "fix it and " after an
# OSError); checks (validate, inspect, preview) and the demo leave nothing to resume.
RESUME_ADVICE = {
    "convert": "committed units are kept, {}rerun with --resume",
    "train": "checkpoints already saved are kept, {}rerun with --resume to continue from the latest",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; the only place that turns errors into exit codes.

    A ``FlamingoDataError`` is one line and its class's exit code (2 bad input, 1 a run that could
    not complete); an ``OSError`` mid-run (a full disk) is one line and 1; Ctrl-C is 130. Any other
    exception is a bug: its traceback is shown and Python exits 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # The trainer parses its own options (flamingo_data.trainconfig, -h included): this
        # parser would refuse them as unrecognized arguments before the trainer saw them.
        args = argparse.Namespace(handler=_train_handler(), train_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    advice = RESUME_ADVICE.get(argv[0], "") if argv else ""
    try:
        return int(args.handler(args) or 0)
    except FlamingoDataError as exc:
        _error(str(exc), advice.format("") if isinstance(exc, RunError) else "")
        return exc.exit_code
    except OSError as exc:  # a full disk or unwritable output mid-run
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}", advice.format("fix it and "))
        return 1
    except KeyboardInterrupt:
        print(f"flamingo-data: interrupted{advice and '; ' + advice.format('')}", file=sys.stderr)
        return 130


def _error(message: str, advice: str) -> None:
    """One line on stderr: ``flamingo-data: error: <message>[; <advice>]``."""
    line = " ".join(message.split()) or "(no message)"
    print(f"flamingo-data: error: {line}{advice and '; ' + advice}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
