"""Output dirs at an fsspec URL (s3://...): images and manifest parts written as immutable objects.

Object stores cannot append, lock or fsync, so a remote output dir works like this:
- each image is one object, written whole (an object appears complete or not at all);
- manifest lines are committed in groups, a part object every COMMIT_S seconds or COMMIT_LINES lines
  (`manifest[.shard-K-of-N].part-<run>-<seq>.jsonl`), always after their images, so every
  `manifest*.jsonl` object is complete and `ok` lines point at images that exist; a kill loses at
  most the lines of the last few seconds, never an image (the next run records them from the images);
- when a run ends its parts are merged into one object (and a killed run's, by the next run of its
  shard): a finished job's manifest is O(shards x runs) objects (output/parts.py);
- each runner holds a lease on its shard, created atomically, so that two runners of one shard, or
  shards of different N, never run at once (output/lease.py);
- a run, `estimate`, `report` and `export` first copy the manifests to a temporary local dir, in
  parallel, and list the image sizes (folder by folder, in parallel); resume trusts an image whose
  size matches its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import OutputError, OutputLocked, UsageError
from ..record import Record
from .lease import Clock, Lease, Leases, conflicts, lease_key
from .ledger import Ledger, encode_event, ledger_name, ledger_paths, read_ledger
from .manifest import IMAGE_FILE, SPEC_SNAPSHOT, ResumeState, manifest_name, read_snapshot, scan
from .parts import RunParts, group, merged_name, part_name, select

VERIFY_THREADS = 16  # objects read at once by --verify: an object store is latency-bound, not bandwidth-bound
READ_THREADS = 16  # manifests downloaded, image folders listed, at once
COMMIT_S = 5.0  # a manifest part at most this long after the first line it holds...
COMMIT_LINES = 5000  # ...or as soon as this many lines wait
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


class _Parts:
    """The part objects one run writes under one base name (its manifest, or its ledger), each also
    kept in a local spool, so that the run's end merges them into one object without reading them back."""

    def __init__(self, store: RemoteStore, base: str) -> None:
        self.store = store
        self.base = base
        self.run = f"{base}.part-{store.run}"
        self.spool = store.path / ".spool" / base
        self.written: list[int] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            seq = (self.written[-1] if self.written else 0) + 1
            self.store._put(part_name(self.run, seq), data)
            self.written.append(seq)
            with self.spool.open("ab") as f:
                f.write(data)

    def merge(self) -> None:
        """The run's parts as one object (written first), then the parts deleted: a kill in between
        leaves both, and readers take the merged object alone (parts.select)."""
        with self._lock:
            if len(self.written) < 2:
                return
            fs, root = self.store.fs, self.store.root
            fs.put_file(str(self.spool), f"{root}/{merged_name(self.run, self.written[-1])}")
            fs.rm([f"{root}/{part_name(self.run, seq)}" for seq in self.written])
            self.written = self.written[-1:]  # nothing left to merge


def _lease_key_of(base: str) -> str:
    """The lease that guards a manifest's or ledger's base name: `manifest.shard-3-of-8` -> shard-3-of-8."""
    _, _, shard = base.partition(".shard-")
    return f"shard-{shard}" if shard else "all"


class RemoteStore:
    """An output dir whose images and manifest parts go to an fsspec URL."""

    remote = True
    repaired_bytes = damaged_lines = removed_temps = 0
    upkeep_s = 1.0  # how often the run's upkeep task calls upkeep()

    def __init__(
        self,
        url: str,
        shard: tuple[int, int] | None = None,
        durable: bool = True,
        *,
        clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.fs, self.root = filesystem(url)
        self._tmp = tempfile.TemporaryDirectory(prefix="runner-remote-")
        self.path = Path(self._tmp.name)
        (self.path / ".spool").mkdir()
        self.display = url
        self.shard = shard
        label = f"{shard[0]}-of-{shard[1]}" if shard else None
        self.manifest_name = manifest_name(label)
        self.ledger_name = ledger_name(label)
        # Parts sort by name in time order: later runs' lines come later (see record.supersedes).
        # To the microsecond: two runs of one shard in one second still sort in the order they ran.
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
        self.run = f"{stamp}-{uuid.uuid4().hex[:8]}"
        self._manifest = _Parts(self, self.manifest_name.removesuffix(".jsonl"))
        self._ledger = _Parts(self, self.ledger_name.removesuffix(".jsonl"))
        self.lease = Lease(Leases(self.fs, self.root, clock), shard, self.run, url, sleep=sleep)
        self.warnings: list[str] = []
        self.merged_runs = 0
        self._lock = threading.Lock()  # the lines waiting for their part: the committer's and upkeep's threads
        self._lines: list[bytes] = []
        self._since: float | None = None  # when the oldest waiting line came (time.monotonic)
        self.source = RemoteSource(self.fs, self.root, {})

    def open(self) -> None:
        """Take the shard's lease (or refuse: OutputLocked), copy the manifests, list the images, and
        merge the parts that runs no longer running left behind."""
        try:
            warning = self.lease.acquire()
            if warning:
                self.warnings.append(warning)
            pulled = pull(self.fs, self.root, self.path)
        except OutputLocked:
            raise
        except Exception as e:  # fsspec backends raise their own kinds (botocore's, say)
            raise OutputError(f"cannot read output dir {self.display}: {type(e).__name__}: {e}") from None
        self.source.sizes = pulled.sizes
        self._merge_finished(pulled.listed)

    def _merge_finished(self, listed: list[str]) -> None:
        """Merge the parts of runs that cannot be running: this shard's (we hold its lease) and those
        of any shard whose runners our lease excludes (another N, or all of them for an unsharded run)."""
        runs, _ = group(listed)
        mine = lease_key(self.shard)
        for entry in runs.values():
            key = _lease_key_of(entry.base)
            if entry.run in (self._manifest.run, self._ledger.run) or not entry.needs_merge():
                continue
            if key != mine and not conflicts(mine, key):
                continue  # another shard of our N: it may be running
            try:
                self._merge_run(entry)
                self.merged_runs += 1
            except Exception as e:  # a store that forbids deletes, say: the parts stay, read as they are
                self.warnings.append(
                    f"could not merge the manifest parts of an earlier run ({entry.run}) in {self.display}: "
                    f"{type(e).__name__}: {e}; they stay as they are (read correctly, only more objects)"
                )

    def _merge_run(self, entry: RunParts) -> None:
        readable, obsolete = entry.readable(), entry.covered()
        if len(readable) > 1:
            with tempfile.NamedTemporaryFile(dir=self.path / ".spool", delete=False) as out:
                for name in readable:
                    data = (self.path / name).read_bytes()
                    out.write(data if data.endswith(b"\n") or not data else data + b"\n")
            try:
                self.fs.put_file(out.name, f"{self.root}/{merged_name(entry.run, entry.last)}")
            finally:
                os.unlink(out.name)
            obsolete += readable  # the new merged object holds them all
        if obsolete:
            self.fs.rm([f"{self.root}/{name}" for name in obsolete])

    def upkeep(self) -> str | None:
        """Called every upkeep_s by a task of the run: commit lines that waited COMMIT_S (when no new
        line came to do it), renew the lease; a reason to stop the run when the lease was lost."""
        with self._lock:
            if self._since is not None and time.monotonic() - self._since >= COMMIT_S:
                self._commit()
        return self.lease.renew()

    def close(self) -> None:
        """Commit what waits, merge this run's parts into one object, release the lease, drop the local
        copy. Raises OutputError when the last lines cannot be written (their images are in the store:
        the next run records them from there)."""
        try:
            with self._lock:
                self._commit()
            for parts in (self._manifest, self._ledger):
                with suppress(Exception):  # the parts are written: merging only makes them fewer
                    parts.merge()
        finally:
            self.lease.release()
            self._tmp.cleanup()

    def scan(self, verify: bool, images: bool = False) -> ResumeState:
        state = scan(self.path, lambda rec: self.source.intact(rec, verify), images)
        state.add_ledger(self.ledger())
        return state

    def ledger(self) -> Ledger:
        return read_ledger(ledger_paths(self.path))

    def scratch_dir(self) -> Path:
        """A private local folder for big temporary files (removed with the store)."""
        return Path(tempfile.mkdtemp(prefix="scratch-", dir=self.path))

    def append_ledger(self, event: dict[str, Any]) -> None:
        """One batch event as an object of its own (an object store cannot append), complete or absent,
        written before this returns; the run's end merges them into one object."""
        self._ledger.write(encode_event(event))

    def orphans(self, state: ResumeState) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for rel in self.source.sizes:
            folder, _, name = rel.rpartition("/")
            m = IMAGE_FILE.fullmatch(name) if folder == f"images/{name[:2]}" else None
            if m and (key := int(m.group(1), 16)) not in state.done and key not in state.bad_images:
                found.setdefault(key, []).append(rel)
        return found

    def read_image(self, rel: str) -> bytes | None:
        try:
            return self.source.read(rel)
        except OSError:
            return None

    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]:
        self._put(rel, data)
        self.source.sizes[rel] = len(data)  # readable at once: an edit chain's child sends it
        return hashlib.sha256(data).hexdigest(), None

    def save_input(self, rel: str, source: str, size: int) -> None:
        if self.source.sizes.get(rel) == size:
            return
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise OutputError(f"cannot read reference image {source}: {e.strerror or e}") from None
        self._put(rel, data)
        self.source.sizes[rel] = size

    def append(self, records: list[Record], lines: list[bytes], now: bool = False) -> None:
        """Group commit: the lines wait (their images are in the store already) until COMMIT_S after
        the first of them, or COMMIT_LINES of them, then go as one part object; `now`: at once (a
        batch is marked collected in the ledger only once its lines are in the store)."""
        with self._lock:
            self._lines.extend(lines)
            at = time.monotonic()
            if self._since is None:
                self._since = at
            if now or len(self._lines) >= COMMIT_LINES or at - self._since >= COMMIT_S:
                self._commit()

    def _commit(self) -> None:
        if self._lines:
            self._manifest.write(b"".join(self._lines))
            self._lines, self._since = [], None

    def read_snapshot(self) -> dict[str, Any]:
        """What the dir remembers of the spec it last ran (spec.json), or {}."""
        return read_snapshot(self.path)

    def write_snapshot(self, summary: dict[str, Any]) -> None:
        self._put(SPEC_SNAPSHOT, json.dumps(summary, indent=2).encode())

    def _put(self, name: str, data: bytes) -> None:
        """One whole object: it appears complete or not at all."""
        try:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        except Exception as e:  # fsspec backends raise their own kinds (botocore's, say)
            raise OutputError(f"cannot write to output dir {self.display}: {type(e).__name__}: {e}") from None
