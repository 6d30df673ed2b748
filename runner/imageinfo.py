"""What an image file is, from its own bytes: whole or cut off, and its pixel size."""

from __future__ import annotations


def is_whole_image(mime: str, data: bytes) -> bool:
    """Are these bytes an image of this type, start to end? A cut-off file must not pass as ok."""
    if mime == "image/png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    if mime in ("image/jpeg", "image/jpg"):
        return data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00\r\n").endswith(b"\xff\xd9")
    if mime == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 == len(data)
    if mime == "image/gif":
        return data[:6] in (b"GIF87a", b"GIF89a") and data.endswith(b";")
    return False


def dimensions(data: bytes | memoryview, mime: str) -> tuple[int, int] | None:
    """Width and height from the header (PNG only here; the quality work adds the rest)."""
    head = bytes(data[:32])
    if mime == "image/png" and head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None
