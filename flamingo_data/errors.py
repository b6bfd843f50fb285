"""The errors the library raises for its caller: one hierarchy, each class carrying its exit code.

``InputError`` (exit 2): the input or the options cannot work; the message names the parameter.
``RunError`` (exit 1): a run that began could not complete. ``flamingo_data.cli.main.main`` maps these
classes, and only these, to one line and the exit code; a built-in exception is a bug and keeps its
traceback. Skips of single items (a bad document, image or sample) are not errors: they are counted
with a reason registered in ``flamingo_data.core.reasons``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import ClassVar


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
