"""The ``flamingo-data`` console script: a thin shell over the library.

Each subcommand lives in ``flamingo_data.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; the module builds a config and calls the library function of the same name.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from flamingo_data.commands.common import UsageError
from flamingo_data.outcome import NothingWritten
from flamingo_data.procpool import WorkerDied
from flamingo_data.units import RunIncomplete

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


def _report_run_warnings() -> None:
    """A run's warnings (too many records rejected) as one ``flamingo-data: warning:`` line each."""
    log = logging.getLogger("flamingo_data.run")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("flamingo-data: warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment, as ``print`` does (main may run many times in
    one process, each with its own stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _train_handler():
    from flamingo_data.commands.train import run

    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # The trainer parses its own options (flamingo_data.trainconfig, -h included): this
        # parser would refuse them as unrecognized arguments before the trainer saw them.
        args = argparse.Namespace(handler=_train_handler(), train_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    _report_run_warnings()
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"flamingo-data: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or unwritable output mid-run: committed units stay valid
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"flamingo-data: error: {exc.strerror or exc}{where}; committed units are kept, fix it and rerun "
            "with --resume",
            file=sys.stderr,
        )
        return 1
    except NothingWritten as exc:  # stats.json says why; --resume would find nothing to redo
        print(f"flamingo-data: error: {exc}", file=sys.stderr)
        return 1
    except (WorkerDied, RunIncomplete) as exc:
        print(
            f"flamingo-data: error: {exc}; committed units are kept, rerun with --resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "flamingo-data: interrupted; committed units are kept, rerun with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
