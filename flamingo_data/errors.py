"""The errors the library raises for its caller: one hierarchy, each class carrying its exit code.

``InputError`` (exit 2): the input or the options cannot work; the message names the parameter in
backticks (`resume`), which a command line shows as its flag (``with_flags``).
``RunError`` (exit 1): a run that began could not complete. ``flamingo_data.cli.main.main`` maps these
classes, and only these, to one line and the exit code; a built-in exception is a bug and keeps its
traceback. Skips of single items (a bad document, image or sample) are not errors: they are counted
with a reason registered in ``flamingo_data.core.reasons``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar

_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


class FlamingoDataError(Exception):
    """Base of every error the library raises on purpose; ``exit_code`` is the CLI's."""

    exit_code: ClassVar[int] = 1


class InputError(FlamingoDataError, ValueError):
    """Bad input or usage: fix it and run again (exit 2). Also a ValueError, which library
    callers caught before these classes existed."""

    exit_code: ClassVar[int] = 2


class UsageError(InputError):
    """An option combination or value the command line refuses."""


class SpecError(InputError):
    """A spec (pattern, glob, folder, file) that names nothing usable."""


class SizesFileError(SpecError):
    """``sizes_path`` names no file, or a sizes.json cannot be written (found before any shard is read)."""


class OutputExistsError(InputError):
    """The output folder holds an earlier run and neither resume nor overwrite was asked for."""


class SettingsMismatch(OutputExistsError):
    """A resume asked for other options than the output's earlier run was written with."""


class LayoutError(InputError):
    """Images were looked for and nearly none were found: wrong layout or wrong image folder."""


class StartError(InputError):
    """Trainer options that cannot work with this model, data or checkpoint, found as the run starts."""


class EmptyDataset(InputError):
    """Shards that hold no sample the loader can use: training on them would never take a step."""


class RemoteUnavailable(InputError):
    """A url whose protocol fsspec does not know, or whose filesystem package is not installed."""


class MissingExtra(InputError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, what: str, package: str, extra: str, hint: str = "") -> None:
        super().__init__(
            f"{what} needs the [{extra}] extra ({package}): pip install 'flamingo-data[{extra}]'{hint}"
        )
        self.what, self.package, self.extra, self.hint = what, package, extra, hint

    def __reduce__(self) -> tuple:  # rebuilt from its parts when it crosses a process boundary
        return (type(self), (self.what, self.package, self.extra, self.hint))


class RunError(FlamingoDataError):
    """A run that began and could not complete (exit 1): what was committed is kept."""

    exit_code: ClassVar[int] = 1


class NothingWritten(FlamingoDataError):
    """The run read its input and wrote no record (exit 1); stats.json says why, so a resume would
    change nothing."""

    exit_code: ClassVar[int] = 1


class WorkerDied(RunError):
    """A worker process ended without returning its result (killed by a signal, often for memory)."""


class RunIncomplete(RunError):
    """Part of the run did not finish (a unit failed on a cluster, img2dataset gave up on a shard)."""


def import_extra(module: str, what: str, extra: str) -> ModuleType:
    """``module`` imported, or ``MissingExtra`` saying that ``what`` needs the ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(what, module, extra) from exc


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each parameter it names in backticks written as its flag where ``flags``
    (parameter -> flag) has one: `batch_size` becomes --batch-size."""
    return _PARAMETER.sub(lambda found: flags.get(found.group(1), found.group(0)), message)


def parser_flags(parser: Any) -> dict[str, str]:
    """Parameter -> flag for every option of an ``argparse`` parser (its longest spelling)."""
    return {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions  # argparse keeps no public list of its options
        if action.option_strings and action.dest != "help"
    }
