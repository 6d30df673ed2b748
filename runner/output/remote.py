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
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from ..errors import OutputError, OutputLocked
from ..record import Record
from .bucket import RemoteSource, filesystem, pull
from .lease import Clock, Lease, Leases, conflicts, lease_key
from .ledger import Ledger, encode_event, ledger_name, ledger_paths, read_ledger
from .manifest import IMAGE_FILE, SPEC_SNAPSHOT, ResumeState, manifest_name, read_snapshot, scan
from .parts import RunParts, group, merged_name, part_name

COMMIT_S = 5.0  # a manifest part at most this long after the first line it holds...
COMMIT_LINES = 5000  # ...or as soon as this many lines wait


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
