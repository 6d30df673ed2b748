"""Where a run's results go: a local directory or an fsspec URL, behind one Store interface."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from ..record import Record
from .local import LocalStore
from .manifest import ResumeState
from .remote import RemoteStore, is_remote, remote_view
from .source import ImageSource, LocalSource

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
MIME_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}  # of the images runner saves


class Store(Protocol):
    """What a run needs of an output dir; LocalStore and RemoteStore are the two kinds."""

    remote: bool
    path: Path  # where the manifests can be read locally (a temporary copy for a remote dir)
    display: str  # how messages name it
    manifest_name: str
    repaired_bytes: int
    damaged_lines: int
    removed_temps: int

    def open(self) -> None: ...
    def close(self) -> None: ...
    def scan(self, verify: bool) -> ResumeState: ...
    def orphans(self, state: ResumeState) -> dict[int, list[str]]: ...
    def read_image(self, rel: str) -> bytes | None: ...
    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]: ...
    def save_input(self, rel: str, source: str, size: int) -> None: ...
    def append(self, records: list[Record], lines: list[bytes]) -> None: ...
    def read_snapshot(self) -> dict[str, Any]: ...
    def write_snapshot(self, summary: dict[str, Any]) -> None: ...


def open_store(target: str | Path, shard: tuple[int, int] | None, durable: bool) -> Store:
    """The store for an output dir, chosen once: every caller after this is the same."""
    if is_remote(target):
        return RemoteStore(str(target), shard, durable)
    return LocalStore(Path(target), shard, durable)


def image_relpath(item_id: str, mime: str, index: int = 0) -> str:
    """images/ab/<item_id>.png: 256 folders, so none holds a million files."""
    suffix = f"-{index}" if index else ""
    return f"images/{item_id[:2]}/{item_id}{suffix}.{EXTENSIONS.get(mime, 'bin')}"


@contextmanager
def open_view(target: str | Path) -> Iterator[tuple[Path, ImageSource]]:
    """Read-only access for report, estimate and export: (dir holding the manifests, images)."""
    if is_remote(target):
        with remote_view(str(target)) as view:
            yield view
    else:
        yield Path(target), LocalSource(Path(target))


__all__ = [
    "ImageSource",
    "LocalSource",
    "LocalStore",
    "RemoteStore",
    "ResumeState",
    "Store",
    "image_relpath",
    "is_remote",
    "open_store",
    "open_view",
]
