"""Split JSON / JSONL inputs into keyed chunk files: one conversion unit per chunk.

A LLaVA-style dataset is usually ONE large JSON array (hundreds of thousands of items), so one unit
per file would convert it on one core, and letting every worker parse the whole file would cost
its memory once per worker. Instead the driver parses each file once, gives every item its key
(an id is only known to be unique once the whole file has been seen), and writes chunks of at
most ``chunk_size`` items as JSONL under ``<out>/_work/_chunks`` (local or remote); each worker reads only
its own chunk.
Chunk files are a deterministic function of the input, so reruns and ``--resume`` see the same units.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flamingo_data.errors import InputError, SettingsMismatch
from flamingo_data.run.units import Unit, unit_names, work_url
from flamingo_data.storage import remote
from flamingo_data.storage.atomic import write_atomic

CHUNK_DIR = "_chunks"  # inside the run's work folder in the output folder (``work_url``)
CHUNKING_FILE = "_chunking.json"  # kept beside the shards so a resume can check it
DEFAULT_CHUNK_SIZE = 10_000
MAX_DEPTH = 100  # real items nest a few levels; the JSON parser gives up near 1000
# the whole id (fullmatch): webdataset splits keys at the first dot, and a newline is no key
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def read_items(path: str) -> Iterator[tuple[int, Any, list[str] | None]]:
    """(index, item, error) from a JSON array or JSONL file; a bad JSONL line gets an error, not a crash.

    Raises OSError / UnicodeDecodeError / ValueError when the file as a whole is unreadable.
    """
    text = remote.read_bytes(path).decode("utf-8-sig")
    if text.lstrip().startswith("["):
        for index, item in enumerate(json.loads(text)):
            yield index, *_checked(item)
        return
    if (whole := one_object(text)) is not None:
        yield 0, *_checked(whole)
        return
    for index, line in enumerate(nonblank_lines(text)):
        try:
            yield index, *_checked(json.loads(line))
        except (ValueError, RecursionError) as exc:  # also a >4300-digit integer, deep nesting
            yield index, None, ["bad_json", str(exc)]


def one_object(text: str) -> dict[str, Any] | None:
    """A pretty-printed file holding one JSON object is that one item, not one bad_json per line.
    Only tried when the object spans lines; JSONL fails fast here (extra data after line one)."""
    body = text.strip()
    if not body.startswith("{") or "\n" not in body:
        return None
    try:
        whole = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return whole if isinstance(whole, dict) else None


def _checked(item: Any) -> tuple[Any, list[str] | None]:
    """(item, None), or (None, error) for an item nested so deeply that writing it into a chunk and
    reading it back in a worker (one level deeper, on a deeper stack) could exceed the recursion limit."""
    if nesting_depth(item) > MAX_DEPTH:
        return None, ["bad_json", f"nested more than {MAX_DEPTH} levels deep"]
    return item, None


def nesting_depth(value: Any) -> int:
    """How many lists/objects deep ``value`` goes, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in _children(node))
    return deepest


def _children(node: dict | list) -> Any:
    return node.values() if isinstance(node, dict) else node


NON_SPACE = re.compile(r"\S")


def nonblank_lines(text: str) -> Iterator[str]:
    """The JSONL lines of ``text`` that hold more than whitespace, in order. Lines end at a newline
    only: ``str.splitlines`` would also cut at U+2028, U+0085 and other characters that JSON
    strings may hold unescaped, splitting one record in several. Whitespace between lines is
    skipped by the regex engine, so a file of blank lines costs no Python step per line."""
    pos = 0
    while (found := NON_SPACE.search(text, pos)) is not None:
        begin = max(text.rfind("\n", pos, found.start()) + 1, pos)
        end = text.find("\n", found.start())
        end = len(text) if end < 0 else end
        yield text[begin:end]
        pos = end + 1


def item_key(stem: str, index: int, item: Any, used: set[str]) -> tuple[str, str | None]:
    """``<stem>-<id>`` when the id is safe and unused, else ``<stem>-<index>``; plus why the key is derived."""
    item_id = item.get("id") if isinstance(item, dict) else None
    safe = isinstance(item_id, str | int) and not isinstance(item_id, bool)
    key = f"{stem}-{item_id}" if safe and SAFE_ID.fullmatch(str(item_id)) else None
    note = None
    if key is None or key in used:
        note = "duplicate_id" if key else "derived"
        key = f"{stem}-{index:07d}"
        while key in used:
            key += "_"
    used.add(key)
    return key, note


def keyed_entries(file_unit: Unit, used: set[str]) -> list[dict[str, Any]]:
    """One chunk line per item (key, index, item or error); one ``file_error`` line if unreadable."""
    entries = []
    try:
        for index, item, error in read_items(file_unit.source):
            key, note = item_key(file_unit.name, index, item, used)
            entry = {"index": index, "key": key, "key_note": note}
            entry.update({"error": error} if error else {"item": item})
            entries.append(entry)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return [{"file_error": f"{type(exc).__name__}: {exc}", "source": file_unit.source}]
    return entries


def write_chunks(
    file_unit: Unit, chunk_dir: str, chunk_size: int, used: set[str]
) -> list[tuple[str, str]]:
    """(unit name, chunk path) for each chunk of one input file; an empty file still gets one."""
    entries = keyed_entries(file_unit, used)
    chunks = []
    for number, start in enumerate(range(0, max(len(entries), 1), chunk_size)):
        name = f"{file_unit.name}-c{number:05d}"
        lines = (
            json.dumps(e, ensure_ascii=True) + "\n" for e in entries[start : start + chunk_size]
        )
        path = remote.join(chunk_dir, f"{name}.jsonl")
        _write(path, "".join(lines).encode("ascii"))
        chunks.append((name, path))
    return chunks


def chunk_units(
    sources: list[str], out_dir: str | Path, chunk_size: int, stem: Callable[[str], str]
) -> list[Unit]:
    """Units for every chunk of every source, in input order; stale chunk files are removed first."""
    if chunk_size < 1:
        raise InputError("chunk_size must be at least 1")
    chunk_dir = remote.join(work_url(out_dir), CHUNK_DIR)
    remove_chunks(out_dir)
    if not remote.is_remote(chunk_dir):
        Path(chunk_dir).mkdir(parents=True)
    units: list[Unit] = []
    used: set[str] = (
        set()
    )  # across files too: file "a" id "b-c" and file "a-b" id "c" are both "a-b-c"
    for file_unit in unit_names(sources, stem):
        for name, path in write_chunks(file_unit, chunk_dir, chunk_size, used):
            units.append(Unit(name=name, source=path, index=len(units)))
    return units


def record_chunk_size(out_dir: str | Path, chunk_size: int, resume: bool) -> None:
    """Remember the chunk size; resuming with another one would pair old markers with new chunks."""
    path = remote.join(str(out_dir), CHUNKING_FILE)
    if resume and remote.exists(path):
        earlier = json.loads(remote.read_bytes(path)).get("chunk_size")
        if earlier != chunk_size:
            raise SettingsMismatch(
                f"{out_dir} was written with `chunk_size` {earlier}, not {chunk_size}: resume with "
                "the same one, or pass `overwrite`"
            )
    _write(path, json.dumps({"chunk_size": chunk_size}).encode())


def _write(path: str, data: bytes) -> None:
    """Atomic rename locally, one object put remotely (chunks live beside the shards so that
    executors on other machines can read them)."""
    if remote.is_remote(path):
        remote.write_bytes(path, data)
    else:
        write_atomic(Path(path), data)


def read_chunk(path: str) -> Iterator[dict[str, Any]]:
    """The entries of one chunk file, in order."""
    for line in remote.read_bytes(path).decode("ascii").splitlines():
        yield json.loads(line)


def remove_chunks(out_dir: str | Path) -> None:
    """Chunks are scratch: rewritten by every run, removed with the work folder once it succeeds."""
    chunk_dir = remote.join(work_url(out_dir), CHUNK_DIR)
    if remote.is_remote(chunk_dir):
        remote.remove_tree(chunk_dir)
    else:
        shutil.rmtree(chunk_dir, ignore_errors=True)
