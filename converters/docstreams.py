"""Plain and compressed jsonl document files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) opened as
bounded binary streams: output past an inflation cap, a cut-off end and corrupt bytes each raise
their own error, and no read returns more than a few MB whatever the input.

``zstandard`` is imported only when a ``.zst`` file is opened.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from flamingo_data.storage import remote

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
# zstd input is fed in pieces this small: one 4-byte RLE block inflates to 128 KiB, so a piece
# gives at most 8 MiB whatever its bytes (zstandard's decompressobj takes no output bound).
ZSTD_PIECE = 256
RAW_BLOCK = 2**16


class StreamError(OSError):
    """A compressed document file that cannot be read to its end."""


class TruncatedStream(StreamError):
    """The compressed stream ends before its end marker: a cut-off download or copy."""


class CorruptStream(StreamError):
    """The bytes are not the compressed format their name says, or fail its checks."""


class InflationBomb(StreamError):
    """The stream inflates past the cap given to ``open_documents``."""


def kind_of(path: str) -> str | None:
    """``jsonl``, ``gz`` or ``zst`` for a document file named so (any case), else None."""
    name = path.lower()
    for suffix, kind in ((".jsonl.gz", "gz"), (".jsonl.zst", "zst"), (".jsonl", "jsonl")):
        if name.endswith(suffix):
            return kind
    return None


@contextmanager
def open_documents(path: str, max_output: int | None = None) -> Iterator[IO[bytes]]:
    """A reader of the file's jsonl bytes, decompressed as its name says. Reads raise
    TruncatedStream, CorruptStream, or InflationBomb once more than ``max_output`` bytes came out."""
    kind = kind_of(path)
    with remote.open_binary(path) as raw:
        if kind == "gz":
            inner: Any = _GzipReader(raw)
        elif kind == "zst":
            inner = _ZstdReader(raw)
        else:
            inner = raw
        yield _Capped(inner, max_output) if max_output is not None else inner


class _Capped:
    """Counts the bytes read through it and raises InflationBomb past ``limit``."""

    def __init__(self, inner: Any, limit: int) -> None:
        self.inner, self.limit, self.total = inner, limit, 0

    def read(self, size: int = -1) -> bytes:
        block = self.inner.read(size)
        self.total += len(block)
        if self.total > self.limit:
            raise InflationBomb(f"inflates past {self.limit} bytes")
        return block


class _GzipReader:
    """gzip (several members too) with its errors turned into StreamError kinds. A read returns
    what one step of inflation gives, so the bytes before a break are returned before its error."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.file = gzip.GzipFile(fileobj=raw, mode="rb")

    def read(self, size: int = -1) -> bytes:
        try:
            block = self.file.read1(size)
            if not block and size != 0 and self.raw.tell() == 0:
                raise CorruptStream("gzip: an empty file, not a gzip stream")
            return block
        except EOFError as exc:
            raise TruncatedStream(f"gzip: {exc}") from exc
        except (OSError, zlib.error) as exc:  # BadGzipFile: not gzip, or a failed CRC or size
            raise CorruptStream(f"gzip: {exc}") from exc


class _ZstdReader:
    """zstd frames one after another, fed ``ZSTD_PIECE`` bytes at a time so that one read's output
    stays bounded; a stream that ends inside a frame is TruncatedStream."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self.zstd = zstandard
        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.started = False  # the current frame has taken input
        self.read_any = False  # the file has given bytes
        self.pending = b""  # compressed bytes not yet fed
        self.out = bytearray()
        self.done = False
        self.error: StreamError | None = None  # raised once the bytes before it are read

    def read(self, size: int = -1) -> bytes:
        want = size if size >= 0 else 2**62
        try:
            while len(self.out) < want and not self.done and self.error is None:
                self._feed()
        except StreamError as exc:
            self.error = exc
        if self.error is not None and not self.out:
            raise self.error
        block = bytes(self.out[:want])
        del self.out[:want]
        return block

    def _feed(self) -> None:
        if not self.pending:
            self.pending = self.raw.read(RAW_BLOCK)
            if not self.pending:
                self.done = True
                if not self.read_any:
                    raise CorruptStream("zstd: an empty file, not a zstd stream")
                if self.started:
                    raise TruncatedStream("zstd: the stream ends inside a frame")
                return
        self.read_any = True
        piece, self.pending = self.pending[:ZSTD_PIECE], self.pending[ZSTD_PIECE:]
        try:
            self.out += self.frame.decompress(piece)
        except self.zstd.ZstdError as exc:
            raise CorruptStream(f"zstd: {exc}") from exc
        self.started = True
        if self.frame.eof:  # the next bytes, if any, start a new frame
            self.pending = self.frame.unused_data + self.pending
            self.frame = self.decompressor.decompressobj()
            self.started = False
