"""Where a run's results go: a local directory or an fsspec URL, behind one Store interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..record import Record
from .bucket import is_remote, remote_view
from .lease import is_live
from .ledger import Ledger, ledger_paths, read_ledger
from .local import LocalStore, local_holders
from .manifest import ResumeState, manifest_paths, read_snapshot, scan
from .remote import RemoteStore
from .source import ImageSource, LocalSource

QUALITY_CACHE = ".quality-cache.tsv"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
MIME_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}  # of the images runner saves


class Store(Protocol):
    """What a run needs of an output dir; LocalStore and RemoteStore are the two kinds."""

    remote: bool
    path: Path  # where the manifests can be read locally (a temporary copy for a remote dir)
    display: str  # how messages name it
    manifest_name: str
    ledger_name: str
    repaired_bytes: int
    damaged_lines: int
    removed_temps: int
    warnings: list[str]  # said loudly at start (a store that cannot keep runners apart, say)
    upkeep_s: float  # > 0: the run calls upkeep() this often while it lives

    def open(self) -> None: ...
    def close(self) -> None: ...
    def upkeep(self) -> str | None: ...
    def scan(self, verify: bool, images: bool = False) -> ResumeState: ...
    def ledger(self) -> Ledger: ...
    def scratch_dir(self) -> Path: ...
    def append_ledger(self, event: dict[str, Any]) -> None: ...
    def orphans(self, state: ResumeState) -> dict[int, list[str]]: ...
    def read_image(self, rel: str) -> bytes | None: ...
    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]: ...
    def save_input(self, rel: str, source: str, size: int) -> None: ...
    def append(self, records: list[Record], lines: list[bytes], now: bool = False) -> None: ...
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


@dataclass
class View:
    """Read-only access to an output dir, for report, estimate and export: its manifests (a
    temporary local copy for a remote dir), its files, its resume state, what it remembers."""

    path: Path  # the manifests, readable here
    source: ImageSource
    display: str  # how messages name the dir
    remote: bool
    leases: Callable[[], dict[str, dict[str, Any]]] = field(default=dict, repr=False)  # remote: key -> newest lease
    fetch: Callable[[str], None] | None = field(default=None, repr=False)  # remote: copy a cache here first
    clock: Callable[[], float] = time.time

    def has_manifests(self) -> bool:
        return self.path.is_dir() and bool(manifest_paths(self.path))

    def scan(self, verify: bool = False, images: bool = False) -> ResumeState:
        """The resume state, by the same rule and the same image check as a run's."""
        intact = lambda rec: self.source.intact(rec, verify)  # noqa: E731
        state = scan(self.path, intact, images) if self.has_manifests() else ResumeState()
        state.add_ledger(self.ledger())
        return state

    def ledger(self) -> Ledger:
        """The batches the dir knows of (output/ledger.py)."""
        return read_ledger(ledger_paths(self.path)) if self.path.is_dir() else Ledger()

    def snapshot(self) -> dict[str, Any]:
        """What the dir remembers of the spec it last ran (spec.json), or {}."""
        return read_snapshot(self.path) if self.path.is_dir() else {}

    def quality_cache(self) -> Path | None:
        """Where the report keeps its image hashes between runs: beside the manifests (for a remote dir,
        a copy that goes back into the bucket when the report added to it)."""
        if self.fetch is not None:
            self.fetch(QUALITY_CACHE)
        return self.path / QUALITY_CACHE

    def running(self) -> dict[str, dict[str, Any]]:
        """Who runs in the dir now, by lease key (`shard-3-of-8`, or `all` for an unsharded run):
        {running: bool, renewed: epoch seconds or None, holder: str}. A remote dir's leases say it;
        a local dir's locks (as this machine sees them)."""
        if not self.remote:
            return local_holders(self.path)
        now = self.clock()
        return {
            key: {"running": is_live(body, now), "renewed": body.get("renewed"),
                  "holder": f"{body.get('host', '?')} pid {body.get('pid', '?')}"}
            for key, body in self.leases().items()
        }  # fmt: skip


@contextmanager
def open_view(target: str | Path) -> Iterator[View]:
    """Read-only access for report, estimate and export."""
    if is_remote(target):
        with remote_view(str(target)) as remote:
            yield View(remote.path, remote.source, str(target), True, remote.leases, remote.fetch)
    else:
        yield View(Path(target), LocalSource(Path(target)), str(target), False)


__all__ = [
    "ImageSource",
    "LocalSource",
    "LocalStore",
    "RemoteStore",
    "ResumeState",
    "Store",
    "View",
    "image_relpath",
    "is_remote",
    "open_store",
    "open_view",
]
