"""Where the bytes of an output dir's images come from: one small interface, and its local implementation."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Protocol

from ..imageinfo import dimensions_of_stream


class ImageSource(Protocol):
    """Read access to the files of an output dir by their path relative to it (`images/ab/<id>.png`).

    `open` returns a binary file that can seek (an fsspec file does); `local_path` is the file on
    this machine when there is one (exports hardlink it), else None (an object store)."""

    def open(self, rel: str) -> BinaryIO: ...

    def exists(self, rel: str) -> bool: ...

    def local_path(self, rel: str) -> Path | None: ...


def _safe(rel: str) -> bool:
    """Inside the dir: relative, no `..`, no NUL. Records are checked on reading; this is the second lock."""
    return (
        bool(rel)
        and not rel.startswith(("/", "\\"))
        and "\x00" not in rel
        and ".." not in rel.replace("\\", "/").split("/")
    )


class LocalSource:
    """An output dir on this machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, rel: str) -> Path:
        if not _safe(rel):
            raise FileNotFoundError(f"not a path inside the output dir: {rel!r}")
        return self.root / rel

    def open(self, rel: str) -> BinaryIO:
        return self._path(rel).open("rb")

    def exists(self, rel: str) -> bool:
        try:
            return self._path(rel).is_file()
        except (FileNotFoundError, OSError):
            return False

    def local_path(self, rel: str) -> Path | None:
        try:
            return self._path(rel)
        except FileNotFoundError:
            return None


def read_dimensions(source: ImageSource, rel: str) -> tuple[int, int] | None:
    """An image's (width, height) from its header in `source`; None when missing or unreadable."""
    try:
        with source.open(rel) as f:

            def read(offset: int, count: int) -> bytes:
                f.seek(offset)
                return f.read(count)

            return dimensions_of_stream(read)
    except (OSError, ValueError):
        return None
