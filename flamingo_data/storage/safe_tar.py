"""Open untrusted tars with the work any header can cause bounded, whatever the Python version.

``tarfile`` parses pax records with regexes that are quadratic on some inputs (CVE-2024-6232, fixed
only in newer CPython releases), reads a GNU long name of any declared size, recurses once per
chained extended header, and in stream mode seeks towards a declared size block by block. Here:
pax records are parsed by linear code, extended headers have a size cap, chains have a depth cap,
and a member whose data would end past the end of the file stops the read.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO

# Real writers (webdataset, tarfile, GNU tar) put a path or a few numbers in an extended header.
MAX_EXTENDED_HEADER_BYTES = 64 * 1024
# Extended headers that may precede one member (GNU tar writes at most 'K', 'L'; pax 'g', 'x').
MAX_HEADER_CHAIN = 8
# Global pax records are applied to every later member: their number bounds the work per member.
MAX_GLOBAL_PAX_RECORDS = 64
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_GNU_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_MAX_LENGTH_DIGITS = 20


class UnsafeTar(tarfile.TarError):
    """A tar header refused before it could cost unbounded work; ``reason`` is the issue code
    (``oversized_header``, ``bad_header``, ``truncated_tar``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(slots=True)
class _ReadLimits:
    """Per-tar state: where the file ends, global pax bytes seen, extended headers in a row."""

    end: int
    global_bytes: int = 0
    depth: int = 0


def open_tar(handle: IO[bytes], mode: str = "r|") -> tarfile.TarFile:
    """``tarfile.open`` on a seekable binary ``handle`` with every header bounded (see the module
    docstring); header problems raise :class:`UnsafeTar`."""
    start = handle.tell()
    end = handle.seek(0, 2)
    handle.seek(start)
    bounded = type("BoundedTarInfo", (_BoundedTarInfo,), {"limits": _ReadLimits(end)})
    return tarfile.open(fileobj=handle, mode=mode, tarinfo=bounded)


def parse_pax_records(body: bytes) -> list[tuple[bytes, bytes]]:
    """(keyword, value) of each ``"<length> <keyword>=<value>\\n"`` record, in one linear pass;
    a NUL where a record would start ends the list (block padding). Raises :class:`UnsafeTar`
    (``bad_header``) on any record of another shape."""
    records: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(body) and body[pos] != 0:
        space = body.find(b" ", pos, pos + _MAX_LENGTH_DIGITS + 1)
        digits = body[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise UnsafeTar("bad_header", f"pax record at byte {pos} has no length field")
        record_end = pos + int(digits)
        if record_end > len(body) or record_end <= space + 2 or body[record_end - 1] != 0x0A:
            raise UnsafeTar("bad_header", f"pax record at byte {pos} has a wrong length {digits!r}")
        equals = body.find(b"=", space + 1, record_end - 1)
        if equals <= space + 1:
            raise UnsafeTar("bad_header", f"pax record at byte {pos} has no keyword=value")
        records.append((body[space + 1 : equals], body[equals + 1 : record_end - 1]))
        pos = record_end
    return records


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo whose extended-header processing is bounded (``tarfile`` documents ``_proc_member``
    as the hook for subclasses); ``limits`` is set per opened tar by :func:`open_tar`."""

    limits: _ReadLimits

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        limits = self.limits
        if limits.depth >= MAX_HEADER_CHAIN:
            raise UnsafeTar("bad_header", f"more than {MAX_HEADER_CHAIN} extended headers in a row")
        limits.depth += 1
        try:
            member = super()._proc_member(tarfile_)
        except (ValueError, IndexError) as exc:  # tarfile's own parsing of sparse maps, numbers
            raise UnsafeTar("bad_header", f"{type(exc).__name__}: {exc}") from None
        finally:
            limits.depth -= 1
        if tarfile_.offset > limits.end:
            raise UnsafeTar(
                "truncated_tar",
                f"member {member.name!r} ends at byte {tarfile_.offset}, past the end of the file"
                f" ({limits.end} bytes)",
            )
        return member

    def _refuse_oversized(self) -> None:
        if self.size > MAX_EXTENDED_HEADER_BYTES:
            kind = "pax" if self.type in _PAX_TYPES else "GNU long-name"
            raise UnsafeTar(
                "oversized_header",
                f"{kind} header {self.type!r} at byte {self.offset} declares {self.size} bytes"
                f" (at most {MAX_EXTENDED_HEADER_BYTES})",
            )

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        self._refuse_oversized()
        return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """``tarfile``'s pax processing with the records parsed by :func:`parse_pax_records`."""
        self._refuse_oversized()
        if self.type == tarfile.XGLTYPE:
            self.limits.global_bytes += self.size
            if self.limits.global_bytes > MAX_EXTENDED_HEADER_BYTES:
                raise UnsafeTar(
                    "oversized_header",
                    f"global pax headers hold over {MAX_EXTENDED_HEADER_BYTES} bytes in all",
                )
        buf = tarfile_.fileobj.read(self._block(self.size))
        if len(buf) < self.size:
            raise UnsafeTar("truncated_tar", f"pax header at byte {self.offset} is cut off")
        records = parse_pax_records(buf[: self.size])
        pax_headers = (
            tarfile_.pax_headers if self.type == tarfile.XGLTYPE else tarfile_.pax_headers.copy()
        )
        self._decode_pax_records(records, pax_headers, tarfile_)
        if self.type == tarfile.XGLTYPE and len(pax_headers) > MAX_GLOBAL_PAX_RECORDS:
            raise UnsafeTar(
                "oversized_header", f"global pax headers hold over {MAX_GLOBAL_PAX_RECORDS} records"
            )
        try:
            next_member = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        if _declares_sparse(pax_headers):
            # the map is not read: every reader of shards refuses a sparse member unread
            next_member.sparse = []
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            next_member._apply_pax_info(pax_headers, tarfile_.encoding, tarfile_.errors)
            next_member.offset = self.offset
            if "size" in pax_headers:
                offset = next_member.offset_data
                if next_member.isreg() or next_member.type not in tarfile.SUPPORTED_TYPES:
                    offset += next_member._block(next_member.size)
                tarfile_.offset = offset
        return next_member

    def _decode_pax_records(
        self, records: list[tuple[bytes, bytes]], pax_headers: dict, tarfile_: tarfile.TarFile
    ) -> None:
        """Into ``pax_headers`` as ``tarfile`` decodes them (``hdrcharset=BINARY`` names keep the
        archive's encoding)."""
        errors = tarfile_.errors
        for keyword, value in records:
            if keyword == b"hdrcharset":
                pax_headers["hdrcharset"] = self._decode_pax_field(value, "utf-8", "utf-8", errors)
        binary = pax_headers.get("hdrcharset") == "BINARY"
        name_encoding = tarfile_.encoding if binary else "utf-8"
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", errors)
            encoding = name_encoding if keyword in tarfile.PAX_NAME_FIELDS else "utf-8"
            fallback = tarfile_.encoding if keyword in tarfile.PAX_NAME_FIELDS else "utf-8"
            pax_headers[keyword] = self._decode_pax_field(raw_value, encoding, fallback, errors)


def _declares_sparse(pax_headers: dict) -> bool:
    """GNU's pax sparse formats 0.0, 0.1 and 1.0, as ``tarfile`` recognises them."""
    return (
        "GNU.sparse.map" in pax_headers
        or "GNU.sparse.size" in pax_headers
        or (
            pax_headers.get("GNU.sparse.major") == "1"
            and pax_headers.get("GNU.sparse.minor") == "0"
        )
    )
