"""Where an image file's own bytes end: a whole file, a cut-off download, or a whole image with other
bytes after it.

Phones append data after a JPEG's end marker (a motion photo's MP4 video, a camera's trailer).
Calling such a file truncated drops a good photo; keeping it whole puts megabytes of video in the
shards. Walking the file's structure finds the image's real end: JPEG segments are skipped by their
lengths, so an EXIF thumbnail's own end marker inside APP1 is not mistaken for the image's, and the
entropy-coded data is scanned for the first real marker; PNG chunks and WebP's RIFF size give theirs
directly. No pixels are decoded.
"""

from __future__ import annotations

_EOI = b"\xff\xd9"
_SOS = 0xDA
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def image_end(data: bytes, fmt: str) -> int | None:
    """Offset just past the image's last byte, or None when the stream is cut off.

    The common case costs nothing: a file that already ends like a whole image returns ``len(data)``
    (trailing NUL/newline padding included, as before); only other files are walked.
    """
    if fmt == "jpeg":
        if data.rstrip(b"\x00\r\n ").endswith(_EOI):
            return len(data)
        return _jpeg_end(data)
    if fmt == "png":
        return _png_end(data)
    if fmt == "webp":
        end = int.from_bytes(data[4:8], "little") + 8
        return end if end <= len(data) else None
    return len(data)


def _jpeg_end(data: bytes) -> int | None:
    """Walk the segments from SOI to the first EOI outside any segment payload."""
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return None  # not at a marker: corrupt
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == _EOI[1]:
            return pos + 2
        elif marker in _STANDALONE:
            pos += 2
        else:
            if pos + 4 > size:
                return None
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == _SOS:
                pos = _after_entropy_data(data, pos)
                if pos is None:
                    return None
    return None


def _after_entropy_data(data: bytes, pos: int) -> int | None:
    """The offset of the marker that ends a scan: 0xFF followed by neither a stuffed 0x00, a restart
    marker, nor another fill byte."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return None
        follower = data[pos + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7:
            pos += 2
        elif follower == 0xFF:
            pos += 1
        else:
            return pos


def _png_end(data: bytes) -> int | None:
    """Walk the chunks (length, type, payload, CRC) from the signature to IEND."""
    if data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND":
        return len(data)
    pos = 8
    while pos + 12 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IEND":
            return end if end <= len(data) else None
        pos = end
    return None
