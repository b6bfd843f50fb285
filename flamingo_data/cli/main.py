"""The ``flamingo-data`` console script: a thin shell over the library.

Each subcommand lives in ``flamingo_data.cli.<name>`` with ``add_arguments(parser)``,
``run(args) -> int`` and optionally ``required_extras(args) -> [(extra, needed by)]``; the module
builds a config and calls the library function of the same name. A command module imports only
the core install's light packages at import time; anything heavy or optional is imported by
``run``, and a missing extra is refused (one line, exit 2) before ``run`` starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from flamingo_data import __version__
from flamingo_data.core.extras import require_extra
from flamingo_data.errors import FlamingoDataError, RunError, parser_flags, with_flags

COMMANDS = {
    "validate": "Check shards are fit for training; write sizes.json",
    "inspect": "Summarise a dataset: counts, histograms, what the loader would keep",
    "preview": "Render documents as HTML, the way the loader will see them",
    "train": "Train a Flamingo model on shards (run under torchrun for several processes)",
    "export-openflamingo": "Write a training run's weights as an OpenFlamingo checkpoint.pt",
    "demo": "Build a small sample, convert, validate, preview and train a tiny model (no network)",
}
CONVERTERS = {
    "mmc4": "MMC4 document shards + downloaded images -> interleaved shards",
    "laion": "LAION-style parquet -> image-text pair shards (downloads with img2dataset)",
    "chatgpt": "ChatGPT-generated sequences -> GPT shards with embedded images",
    "conversations": "LLaVA-style conversation JSON + image folder -> interleaved or GPT shards",
    "obelics": "OBELICS-style interleaved documents + images by url -> interleaved shards",
}
# an option shared by several commands whose value needs an extra: (option, value) -> extra
OPTION_EXTRAS = {
    ("executor", "spark"): "spark",
    ("executor", "ray"): "ray",
    ("encoder", "jpegli"): "jpegli",
}


DESCRIPTION = (
    "Turn multimodal web data into training-ready WebDataset shards, prove them fit for "
    "training, and train a Flamingo model on them."
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless the text already names it or there is none
    (an unset option, a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default in (None, False, "", argparse.SUPPRESS) or default == []
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Only the subcommand ``argv`` names gets its options, so only
    that command's module is imported (``--help`` imports none); ``argv`` None: every subcommand."""
    parser = argparse.ArgumentParser(
        prog="flamingo-data",
        description=DESCRIPTION,
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flamingo-data {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser(
        "convert",
        help="Convert a source format into WebDataset shards",
        formatter_class=DefaultsHelpFormatter,
    )
    convert_sub = convert.add_subparsers(dest="source", required=True)
    for name, help_text in CONVERTERS.items():
        wanted = argv is None or list(argv[:2]) == ["convert", name]
        _add(convert_sub, name, help_text, f"flamingo_data.cli.convert_{name}", wanted)
    for name, help_text in COMMANDS.items():
        wanted = argv is None or list(argv[:1]) == [name]
        _add(sub, name, help_text, f"flamingo_data.cli.{name.replace('-', '_')}", wanted)
    return parser


def _add(
    sub: argparse._SubParsersAction, name: str, help_text: str, module_name: str, wanted: bool
) -> None:
    """A subcommand; its options (and its module's imports) only when ``wanted``."""
    parser = sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
    )
    if wanted:
        _bind(parser, importlib.import_module(module_name))


def _bind(parser: argparse.ArgumentParser, module: Any) -> None:
    module.add_arguments(parser)
    flags = parser_flags(parser)
    flags.update((name, flags[dest]) for name, dest in PARAMETER_DESTS.items() if dest in flags)
    parser.set_defaults(
        handler=module.run,
        required_extras=getattr(module, "required_extras", _no_extras),
        flags=flags,
    )


def _no_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    return []


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


def check_extras(args: argparse.Namespace) -> None:
    """Raise MissingExtra for the first extra the parsed command needs and lacks, before it runs
    (so before it writes anything): its own (``required_extras(args)`` -> [(extra, needed by)])
    and those of shared options such as ``--executor spark``."""
    needed = list(args.required_extras(args))
    for (option, value), extra in OPTION_EXTRAS.items():
        if getattr(args, option, None) == value:
            needed.append((extra, f"--{option} {value}"))
    for extra, needed_by in needed:
        require_extra(extra, needed_by)


# Library parameter names whose option has another name on the command line.
PARAMETER_DESTS = {
    "layout": "image_layout",
    "out_dir": "out",
    "write_rejects": "rejects",
    "sizes_path": "sizes",
    "json_specs": "json",
    "specs": "sequences",
    "download": "download_images",
}

# What survives a run that stopped, by the command that ran it ({} takes "fix it and " after an
# OSError); checks (validate, inspect, preview) and the demo leave nothing to resume.
RESUME_ADVICE = {
    "convert": "committed units are kept, {}rerun with --resume",
    "train": "checkpoints already saved are kept, {}rerun with --resume to continue from the latest",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run its subcommand: see ``run_command``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(argv).parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; the only place that turns errors into exit codes.

    A ``FlamingoDataError`` is one line and its class's exit code (2 bad input, 1 a run that could
    not complete); an ``OSError`` mid-run (a full disk) is one line and 1; Ctrl-C is 130. Any other
    exception is a bug: its traceback is shown and Python exits 1."""
    advice = RESUME_ADVICE.get(args.command, "")
    _report_run_warnings()
    try:
        check_extras(args)
        return int(args.handler(args) or 0)
    except FlamingoDataError as exc:
        message = with_flags(str(exc), getattr(args, "flags", {}))
        _error(message, advice.format("") if isinstance(exc, RunError) else "")
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
