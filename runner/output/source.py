"""Where the bytes of an output dir's images come from: one small interface, and its local implementation."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..imageinfo import dimensions_of_stream
from ..record import safe_relpath
from .files import Jail
from .manifest import image_intact


class ImageSource(Protocol):
    """Read access to the files of an output dir by their path relative to it (`images/ab/<id>.png`).

    `open` returns a binary file that can seek (an fsspec file does); `local_path` is the file on
    this machine when there is one (exports hardlink it), else None (an object store)."""

    def open(self, rel: str) -> BinaryIO: ...

    def exists(self, rel: str) -> bool: ...

    def local_path(self, rel: str) -> Path | None: ...

    def intact(self, rec: Mapping[str, Any], full: bool = False) -> bool:
        """Is an ok record's image there and whole (size, and the sha256 where it must be read)?"""
        ...


class LocalSource:
    """An output dir on this machine, read without following a link anywhere below it (files.Jail)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._jail = Jail(self.root)

    def open(self, rel: str) -> BinaryIO:
        if not safe_relpath(rel):
            raise FileNotFoundError(f"not a path inside the output dir: {rel!r}")
        try:
            return os.fdopen(self._jail.open(rel, os.O_RDONLY), "rb")
        except OSError as e:
            raise FileNotFoundError(f"{self.root / rel}: {e.strerror or e}") from None

    def exists(self, rel: str) -> bool:
        try:
            st = self._jail.lstat(rel) if safe_relpath(rel) else None
        except OSError:
            return False
        return st is not None and stat.S_ISREG(st.st_mode)

    def local_path(self, rel: str) -> Path | None:
        return self.root / rel if self.exists(rel) else None

    def intact(self, rec: Mapping[str, Any], full: bool = False) -> bool:
        """Size and mtime as recorded are trusted (like rsync); otherwise, or with `full`, the sha256 decides."""
        return image_intact(self.root, rec, full)


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
