"""Read what a run wrote: manifest lines, repaired tails, and the compact resume state."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policy import PERMANENT

MANIFEST = "manifest.jsonl"
TORN_SUFFIX = ".torn"  # manifest.jsonl.torn: cut-off lines set aside by repair


def manifest_name(shard_label: str | None) -> str:
    return MANIFEST if shard_label is None else f"manifest.shard-{shard_label}.jsonl"


def manifest_paths(out: Path) -> list[Path]:
    """Every manifest in an output dir: the plain one and one per shard."""
    return sorted(p for p in out.glob("manifest*.jsonl") if p.is_file())


def repair(path: Path) -> int:
    """Cut a torn last line (a kill mid-write) off the manifest and keep it aside; bytes moved."""
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline; the tail after it never finished.
        pos, chunk = size, 65536
        cut = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        f.seek(cut)
        tail = f.read()
        with path.with_name(path.name + TORN_SUFFIX).open("ab") as aside:
            aside.write(tail + b"\n")
            aside.flush()
            os.fsync(aside.fileno())
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        return len(tail)


def iter_records(out: Path, bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Every parseable manifest line in file order; unparseable ones are counted in `bad`."""
    for path in manifest_paths(out):
        yield from _records(path, bad)


def _records(path: Path, bad: list[int] | None = None) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("item_id"), str):
                yield rec
            elif line.strip() and bad is not None:
                bad.append(1)


# The resume index: beside each manifest, `.manifest.jsonl.idx` holds one tab-separated line
# per record with only what resume needs, and the manifest's size after that record. Parsing
# it is several times faster than parsing the JSON; it is a cache, trusted only while its last
# offset equals the manifest's size, and rebuilt from the manifest otherwise.
_INDEX_FIELDS = ("item_id", "status", "kind", "image_path", "bytes", "mtime_ns", "sha256", "cost_usd")


def index_path(manifest: Path) -> Path:
    return manifest.with_name(f".{manifest.name}.idx")


def index_lines(records: list[dict[str, Any]], start: int, lengths: list[int]) -> bytes:
    """Index lines for records whose manifest lines of `lengths` bytes begin at offset `start`."""
    out = []
    end = start
    for rec, length in zip(records, lengths, strict=True):
        end += length
        kind = (rec.get("error") or {}).get("kind") or ""
        fields = (rec["item_id"], rec["status"], kind, rec.get("image_path") or "", rec.get("bytes") or "",
                  rec.get("mtime_ns") or "", rec.get("sha256") or "", float(rec.get("cost_usd") or 0), end)  # fmt: skip
        out.append("\t".join(map(str, fields)))
    return ("\n".join(out) + "\n").encode() if out else b""


def index_valid(manifest: Path) -> bool:
    try:
        size = manifest.stat().st_size
        with index_path(manifest).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except OSError:
        return False
    return tail.rsplit(b"\t", 1)[-1] == str(size).encode() if tail else size == 0


def rebuild_index(manifest: Path) -> None:
    """Write the manifest's index afresh (after a crash, a repair or an older runner)."""
    idx = index_path(manifest)
    tmp = idx.with_name(idx.name + ".tmp")
    offset = 0
    with manifest.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            start, offset = offset, offset + len(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("item_id"), str):
                dst.write(index_lines([rec], start, [len(line)]))
    os.replace(tmp, idx)


def _index_rows(manifest: Path) -> Iterator[dict[str, Any]]:
    with index_path(manifest).open(encoding="utf-8") as f:
        for line in f:
            item_id, status, kind, rel, size, mtime, sha, cost, _ = line.split("\t")
            yield {
                "item_id": item_id, "status": status, "error": {"kind": kind} if kind else None,
                "image_path": rel or None, "bytes": int(size) if size else None,
                "mtime_ns": int(mtime) if mtime else None, "sha256": sha or None, "cost_usd": float(cost),
            }  # fmt: skip


def supersedes(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Does `new` replace `old` as the record that counts for an item?

    The later line does, except that a failure never replaces an ok: an ok item is not sent
    again unless its image went bad, so a failure read after an ok comes from another
    manifest (shards, remote parts) whose lines are not in time order with this one."""
    return old is None or new.get("status") == "ok" or old.get("status") != "ok"


def latest(out: Path) -> dict[str, dict[str, Any]]:
    """item_id -> the record that counts. Holds every record: for reports, not resume."""
    last: dict[str, dict[str, Any]] = {}
    for rec in iter_records(out):
        if supersedes(rec, last.get(rec["item_id"])):
            last[rec["item_id"]] = rec
    return last


def image_intact(out: Path, rec: dict[str, Any], full: bool = False) -> bool:
    """Is the record's image there and whole? Size and mtime as recorded are trusted (like rsync);
    otherwise, or with `full`, the sha256 decides."""
    rel = rec.get("image_path")
    if not isinstance(rel, str):
        return False
    path = f"{out}{os.sep}{rel}"  # a plain string: a Path per image made resume twice as slow
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_size != rec.get("bytes"):
        return False
    if not full and st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    return sha256_file(Path(path)) == rec.get("sha256")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ResumeState:
    """What resume needs, as sets of integer ids: flat in memory for a million items."""

    done: set[int] = field(default_factory=set)
    retryable: set[int] = field(default_factory=set)
    permanent: set[int] = field(default_factory=set)
    bad_images: set[int] = field(default_factory=set)  # latest record ok, image missing or corrupt
    spent_usd: float = 0.0
    bad_lines: int = 0

    def pending(self, key: int, retry_failed: bool) -> bool:
        """Will a run send this item? Not if done, nor if it failed permanently (unless retried)."""
        return key not in self.done and (retry_failed or key not in self.permanent)

    def known(self, key: int) -> bool:
        return key in self.done or key in self.retryable or key in self.permanent or key in self.bad_images

    def known_count(self, owns: Callable[[int], bool] | None = None) -> int:
        """How many items have records (of one shard, with `owns`)."""
        sets = (self.done, self.retryable, self.permanent, self.bad_images)
        if owns is None:
            return sum(map(len, sets))
        return sum(1 for s in sets for key in s if owns(key))


def scan(out: Path, full_verify: bool = False, image_sizes: dict[str, int] | None = None) -> ResumeState:
    """Resolve the latest record per item and check the images of the ok ones.

    `image_sizes` ({image_path: size}, from a remote listing) replaces the local file check."""
    state = ResumeState()
    bad: list[int] = []
    rows = (rec for p in manifest_paths(out) for rec in (_index_rows(p) if index_valid(p) else _records(p, bad)))
    for rec in rows:
        cost = rec.get("cost_usd")
        if isinstance(cost, (int, float)):
            state.spent_usd += cost
        try:
            key = int(rec["item_id"], 16)
        except ValueError:
            continue
        if key in state.done:  # an ok with an intact image stands (see supersedes)
            continue
        if state.known(key):  # a later record supersedes an earlier one
            for s in (state.done, state.retryable, state.permanent, state.bad_images):
                s.discard(key)
        if rec.get("status") == "ok":
            if image_sizes is not None:
                intact = image_sizes.get(rec.get("image_path") or "") == rec.get("bytes")
            else:
                intact = image_intact(out, rec, full_verify)
            (state.done if intact else state.bad_images).add(key)
        else:
            kind = (rec.get("error") or {}).get("kind")
            (state.permanent if kind in PERMANENT else state.retryable).add(key)
    state.bad_lines = len(bad)
    return state
