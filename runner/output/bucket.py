"""Reading an output dir at an fsspec URL: its filesystem, a local copy of its manifests, its images.

`pull` copies the manifests to a local dir and lists the image sizes, folder by folder, in
parallel; `RemoteSource` reads and checks the images where they are; `remote_view` is the
read-only look `estimate`, `report` and `export` take.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import OutputError, UsageError
from .lease import Leases
from .manifest import SPEC_SNAPSHOT
from .parts import select

VERIFY_THREADS = 16  # objects read at once by --verify: an object store is latency-bound, not bandwidth-bound
READ_THREADS = 16  # manifests downloaded, image folders listed, at once
HINT = "remote output dirs need runner's optional s3 extra: pip install -e '.[s3]' in its checkout (fsspec and s3fs)"


def is_remote(target: str | Path) -> bool:
    text = str(target)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: {HINT}") from None
    try:
        # A fresh instance: fsspec's cache would keep credentials and endpoints from an earlier
        # environment in a long-lived process.
        fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    except (ImportError, ValueError) as e:
        raise UsageError(f"{url}: {e}; {HINT}") from None
    return fs, root.rstrip("/")


@dataclass
class Pulled:
    sizes: dict[str, int] = field(default_factory=dict)  # image and input paths -> size
    listed: list[str] = field(default_factory=list)  # the manifest and ledger objects there (parts included)
    read: list[str] = field(default_factory=list)  # the objects copied (one per run, or its parts)


def _entries(fs: Any, path: str) -> list[dict[str, Any]]:
    try:
        return cast(list[dict[str, Any]], fs.ls(path, detail=True, refresh=True))
    except FileNotFoundError:
        return []


def _basename(info: Mapping[str, Any]) -> str:
    return str(info["name"]).rstrip("/").rsplit("/", 1)[-1]


def _tree(fs: Any, root: str, folder: str) -> dict[str, int]:
    """{path relative to root: size} of every object under `folder`: its subfolders listed in parallel
    (images/00 ... images/ff), not one listing of a million names page after page."""
    entries = _entries(fs, f"{root}/{folder}")
    found = {str(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}
    subfolders = [str(e["name"]) for e in entries if e.get("type") == "directory"]

    def find(path: str) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], fs.find(path, detail=True))
        except FileNotFoundError:
            return {}

    if subfolders:
        with ThreadPoolExecutor(min(READ_THREADS, len(subfolders)), thread_name_prefix="runner-list") as pool:
            for listing in pool.map(find, subfolders):
                found.update({name: int(info.get("size") or 0) for name, info in listing.items()})
    prefix = len(root) + 1
    return {name[prefix:]: size for name, size in found.items() if name.startswith(root + "/")}


def pull(fs: Any, root: str, dest: Path) -> Pulled:
    """Copy the manifests (per run: its merged object and the parts it does not hold), the ledgers
    and the spec snapshot to `dest`, in parallel; list the image sizes."""
    for attempt in range(3):
        top = {_basename(e): e for e in _entries(fs, root) if e.get("type") != "directory"}
        listed = [n for n in top if n.startswith(("manifest", "batches")) and n.endswith(".jsonl")]
        names = select(listed) + ([SPEC_SNAPSHOT] if SPEC_SNAPSHOT in top else [])

        def get(name: str) -> None:
            fs.get_file(f"{root}/{name}", str(dest / name))

        try:
            if names:
                with ThreadPoolExecutor(min(READ_THREADS, len(names)), thread_name_prefix="runner-pull") as pool:
                    list(pool.map(get, names))
        except FileNotFoundError:  # a merge deleted parts since the listing: list again
            if attempt == 2:
                raise
            for path in dest.iterdir():
                if path.is_file():
                    path.unlink()
            continue
        break
    sizes: dict[str, int] = {}
    for folder in ("images", "inputs"):
        sizes.update(_tree(fs, root, folder))
    return Pulled(sizes, listed, names)


class RemoteSource:
    """The files of a remote output dir (an output.source.ImageSource), known from one listing."""

    def __init__(self, fs: Any, root: str, sizes: dict[str, int]) -> None:
        self.fs, self.root, self.sizes = fs, root, sizes
        self._hashes: dict[str, str] | None = None  # image path -> sha256, read once for a full check

    def intact(self, rec: Mapping[str, Any], full: bool = False) -> bool:
        """An object whose size is the recorded one is trusted; with `full`, its sha256 decides
        (every image is read once, VERIFY_THREADS at a time, on the first full check)."""
        rel = rec.get("image_path")
        if not isinstance(rel, str) or self.sizes.get(rel) != rec.get("bytes"):
            return False
        if not full:
            return True
        if self._hashes is None:
            self._hashes = self._hash_all()
        return self._hashes.get(rel) == rec.get("sha256")

    def _hash_all(self) -> dict[str, str]:
        def digest(rel: str) -> tuple[str, str | None]:
            h = hashlib.sha256()
            try:
                with self.open(rel) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            except OSError:
                return rel, None
            return rel, h.hexdigest()

        images = [rel for rel in self.sizes if rel.startswith("images/")]
        with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="runner-verify") as pool:
            return {rel: sha for rel, sha in pool.map(digest, images) if sha is not None}

    def open(self, rel: str) -> BinaryIO:
        if rel not in self.sizes:
            raise FileNotFoundError(rel)
        try:
            return cast(BinaryIO, self.fs.open(f"{self.root}/{rel}", "rb"))
        except Exception as e:  # fsspec backends raise their own kinds
            raise FileNotFoundError(f"{self.root}/{rel}: {type(e).__name__}: {e}") from None

    def exists(self, rel: str) -> bool:
        return rel in self.sizes

    def local_path(self, rel: str) -> Path | None:
        return None

    def read(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()


@dataclass
class RemoteView:
    """What a read-only look at a remote output dir gives: the local copy, the images, the leases,
    and `fetch` for the caches kept beside the data (copied on demand, uploaded back if changed)."""

    path: Path
    source: RemoteSource
    leases: Callable[[], dict[str, dict[str, Any]]]  # lease key -> its newest lease object
    fetch: Callable[[str], None]


@contextmanager
def remote_view(url: str) -> Iterator[RemoteView]:
    """A temporary local copy of a remote output dir's manifests, and its images."""
    fs, root = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="runner-remote-") as tmp:
        try:
            pulled = pull(fs, root, Path(tmp))
        except Exception as e:  # fsspec backends raise their own kinds (botocore's, say)
            raise OutputError(f"cannot read output dir {url}: {type(e).__name__}: {e}") from None
        fetched: dict[str, tuple[int, int] | None] = {}

        def fetch(name: str) -> None:
            if name not in fetched:
                with suppress(FileNotFoundError):
                    fs.get_file(f"{root}/{name}", str(Path(tmp) / name))
                fetched[name] = _stamp(Path(tmp) / name)

        yield RemoteView(Path(tmp), RemoteSource(fs, root, pulled.sizes), lambda: Leases(fs, root).current(), fetch)
        for name, before in fetched.items():
            if (stamp := _stamp(Path(tmp) / name)) is not None and stamp != before:
                with suppress(Exception):  # a cache only saves time: a read-only bucket must not fail the report
                    fs.put_file(str(Path(tmp) / name), f"{root}/{name}")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def upload_dir(url: str, local: Path, sub: str = "") -> str:
    """Upload every file of `local` into the remote output dir (under `sub`); returns where they went."""
    fs, root = filesystem(url)
    target = f"{root}/{sub}".rstrip("/")
    try:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{target}/{path.relative_to(local).as_posix()}")
    except Exception as e:  # fsspec backends raise their own kinds
        raise OutputError(f"cannot write to output dir {url}: {type(e).__name__}: {e}") from None
    return f"{url.rstrip('/')}/{sub}".rstrip("/")
