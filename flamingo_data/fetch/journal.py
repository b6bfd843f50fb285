"""A download's per-url journal: every url's final outcome, written as soon as it is known, so that
an interrupted download resumes without fetching any url again.

img2dataset resumes by whole shards; its download processes write here too (one append-only log
per process), and on the next run each url logged is answered from the log instead of the web.
A log is a run of entries, each a JSON header line ``{"url", "error", "size"}`` followed by
``size`` body bytes; an entry cut off by the interruption is ignored.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

LOG_SUFFIX = ".log"


@dataclass(frozen=True, slots=True)
class Logged:
    """One url's outcome: its body where it is (``path``, ``offset``, ``size``) or its ``error``."""

    path: Path
    offset: int
    size: int
    error: str | None


def read_log(path: Path) -> dict[str, Logged]:
    """The complete entries of one log, by url."""
    entries: dict[str, Logged] = {}
    with open(path, "rb") as handle:
        for url, logged in _entries(handle, path):
            entries[url] = logged
    return entries


def _entries(handle: BinaryIO, path: Path) -> list[tuple[str, Logged]]:
    entries = []
    end = os.fstat(handle.fileno()).st_size
    while line := handle.readline():
        try:
            header = json.loads(line)
            url, error, size = header["url"], header["error"], int(header["size"])
        except (ValueError, KeyError, TypeError):
            break  # a header cut off mid-line: the interruption's last entry
        offset = handle.tell()
        if offset + size > end:
            break
        entries.append((url, Logged(path, offset, size, error)))
        handle.seek(offset + size)
    return entries


def read_journal(folder: str | Path) -> dict[str, Logged]:
    """Every complete entry of every log in ``folder`` (none when it does not exist)."""
    entries: dict[str, Logged] = {}
    for path in sorted(Path(folder).glob(f"*{LOG_SUFFIX}")):
        entries.update(read_log(path))
    return entries


def logged_body(logged: Logged) -> bytes:
    with open(logged.path, "rb") as handle:
        handle.seek(logged.offset)
        return handle.read(logged.size)


@dataclass
class Journal:
    """One process's view: earlier entries (read once) and its own log, appended by any thread."""

    folder: Path
    earlier: dict[str, Logged] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _log: BinaryIO | None = None

    @classmethod
    def open(cls, folder: str | Path) -> Journal:
        return cls(Path(folder), read_journal(folder))

    def lookup(self, url: str) -> Logged | None:
        return self.earlier.get(url)

    def record(self, url: str, body: bytes | None, error: str | None) -> None:
        """Append one url's outcome and flush it to the operating system."""
        data = body or b""
        header = json.dumps({"url": url, "error": error, "size": len(data)}).encode() + b"\n"
        with self._lock:
            if self._log is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}{LOG_SUFFIX}"
                self._log = open(self.folder / name, "ab")  # noqa: SIM115 (open for the process's life)
            self._log.write(header + data)
            self._log.flush()


@dataclass
class JournalCounter:
    """How many entries the journal's logs hold, read incrementally (for a progress bar)."""

    folder: Path
    _seen: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> (offset, entries)

    def count(self) -> int:
        for path in Path(self.folder).glob(f"*{LOG_SUFFIX}"):
            offset, entries = self._seen.get(path, (0, 0))
            with open(path, "rb") as handle:
                handle.seek(offset)
                for _url, logged in _entries(handle, path):
                    entries += 1
                    offset = logged.offset + logged.size
            self._seen[path] = (offset, entries)
        return sum(entries for _offset, entries in self._seen.values())
