"""Pixel size and completeness of an image from its own header bytes: PNG, JPEG, WebP, GIF; stdlib only.

A few bytes name the size (PNG IHDR, JPEG SOFn, WebP VP8/VP8L/VP8X, GIF screen descriptor), so no
decoder is needed and a 4K image costs the same as a thumbnail. The readers never raise on
garbage: anything they cannot read is None.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): C0-CF except
# DHT (C4), JPG (C8) and DAC (CC), which share the range but carry no frame header.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM, RST0-7, SOI.
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8), 0xD8))
_MAX_SIDE = 1 << 24  # no format here can say more; a bigger number is garbage

Reader = Callable[[int, int], bytes]  # (offset, count) -> at most count bytes from offset


def is_whole_image(mime: str, data: bytes) -> bool:
    """Are these bytes an image of this type, start to end, with a header that says its size? A
    cut-off file must not pass as ok, nor bytes that only start and end like an image (a PNG
    signature, HTML, an IEND trailer): no PNG IHDR, JPEG SOF, WebP VP8* or GIF screen, no image."""
    head = data[:32]
    if mime == "image/png":
        whole = data.startswith(PNG_SIGNATURE) and data.endswith(b"IEND\xaeB`\x82")
        size = _png(head) if whole else None
    elif mime in ("image/jpeg", "image/jpg"):
        whole = data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00\r\n").endswith(b"\xff\xd9")
        size = _jpeg(lambda offset, count: data[offset : offset + count]) if whole else None
    elif mime == "image/webp":
        whole = data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 == len(data)
        size = _webp(head) if whole else None
    elif mime == "image/gif":
        whole = data[:6] in (b"GIF87a", b"GIF89a") and data.endswith(b";")
        size = _gif(head) if whole else None
    else:
        return False
    return size is not None and 0 < size[0] <= _MAX_SIDE and 0 < size[1] <= _MAX_SIDE


def dimensions(data: bytes | bytearray | memoryview, mime: str = "") -> tuple[int, int] | None:
    """(width, height) from an image's header, or None when it cannot be read.

    The format is sniffed from the bytes themselves (`mime` is only a hint, since a server may
    label a JPEG as PNG); a truncated or garbage input gives None, never an exception."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data

    def read(offset: int, count: int) -> bytes:
        return bytes(view[offset : offset + count]) if offset >= 0 else b""

    return _dimensions(read)


def dimensions_of_file(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) of an image file, reading only the header (JPEG: seeking past big segments)."""
    try:
        with Path(path).open("rb") as f:

            def read(offset: int, count: int) -> bytes:
                f.seek(offset)
                return f.read(count)

            return _dimensions(read)
    except OSError:
        return None


def dimensions_of_stream(read: Reader) -> tuple[int, int] | None:
    """(width, height) through a positional reader, for stores that are not local files."""
    return _dimensions(read)


def _dimensions(read: Reader) -> tuple[int, int] | None:
    try:
        head = read(0, 32)
        if head.startswith(PNG_SIGNATURE):
            size = _png(head)
        elif head.startswith(b"\xff\xd8"):
            size = _jpeg(read)
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            size = _webp(head)
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            size = _gif(head)
        else:
            size = None
    except (OSError, ValueError, IndexError):
        return None
    if size is None or not (0 < size[0] <= _MAX_SIDE and 0 < size[1] <= _MAX_SIDE):
        return None
    return size


def _png(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _gif(head: bytes) -> tuple[int, int] | None:
    if len(head) < 10:
        return None
    return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if kind == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _jpeg(read: Reader) -> tuple[int, int] | None:
    """Walk the marker segments from SOI to the first SOFn; APPn and COM of any size are skipped
    by their length (a file padded with hundreds of 64 KB comments costs one read per segment)."""
    pos = 2
    while True:
        header = read(pos, 4)
        if len(header) < 2 or header[0] != 0xFF:
            return None
        marker = header[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA) or len(header) < 4:  # EOI or scan data before any frame header
            return None
        length = int.from_bytes(header[2:4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            frame = read(pos + 4, 5)  # precision, height, width
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        pos += 2 + length
