"""OBELICS-style document files read one document at a time: ``.parquet`` (a batch of rows at a
time, never the whole file) and ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (MMC4's bounded line
reader). Each yields ``(key, item)``: the document as a dict, a ``DocumentError`` for a line that is
not one, or None for a line over MMC4's line cap. A file that cannot be read is a unit reject; the
documents read before a break are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flamingo_data.converters.docstreams import kind_of
from flamingo_data.converters.mmc4 import stream_unit_lines, unit_stem
from flamingo_data.converters.obelics_docs import METADATA_FIELDS, DocumentError, parse_line
from flamingo_data.run.units import Unit, UnitContext
from flamingo_data.storage import remote
from flamingo_data.storage.shard_writer import safe_stem

PARQUET_SUFFIX = ".parquet"
REQUIRED_COLUMNS = ("images", "texts")
BATCH_ROWS = 256  # rows decoded at once: OBELICS documents are kilobytes, a batch a few MB

Item = dict[str, Any] | DocumentError | None


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIX)


def document_stem(path: str) -> str:
    """The unit's name: the file's name less ``.parquet`` (MMC4's rule for the jsonl suffixes)."""
    name = Path(path).name
    if is_parquet(name):
        return safe_stem(name[: -len(PARQUET_SUFFIX)])
    return unit_stem(path)


def is_document_file(path: str) -> bool:
    return is_parquet(path) or kind_of(path) is not None


def unit_items(unit: Unit, ctx: UnitContext) -> Iterator[tuple[str, Item]]:
    """(``<unit>-<row or line number>``, item) for each document of the unit's file; rows and
    lines are numbered from 1 (blank lines counted), so the same documents as parquet and as
    jsonl get the same keys."""
    if is_parquet(unit.source):
        yield from _parquet_items(unit, ctx)
        return
    for key, line in stream_unit_lines(unit, ctx):
        yield key, None if line is None else line_item(line)


def line_item(line: bytes) -> Item:
    """The line's JSON value, or the DocumentError saying why it has none."""
    try:
        return parse_line(line)
    except DocumentError as exc:
        return exc


def _parquet_items(unit: Unit, ctx: UnitContext) -> Iterator[tuple[str, Item]]:
    """Rows a batch at a time; a file that is no parquet, lacks ``images``/``texts`` or breaks
    off mid-read is a unit reject (rows before a break kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0  # rows read
    try:
        with remote.open_binary(unit.source) as handle:
            parquet = pq.ParquetFile(handle)
            names = set(parquet.schema_arrow.names)
            if missing := [c for c in REQUIRED_COLUMNS if c not in names]:
                detail = f"no {' or '.join(missing)} column"
                ctx.reject("units", unit.name, "missing_columns", detail)
                return
            columns = [c for c in (*REQUIRED_COLUMNS, *METADATA_FIELDS) if c in names]
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    number += 1
                    yield f"{unit.name}-{number:07d}", row
    except (pa.ArrowException, OSError, ValueError) as exc:
        ctx.reject("units", unit.name, "unreadable_parquet", f"{type(exc).__name__}: {exc}")
