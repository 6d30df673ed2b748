"""Read what a run wrote: manifest lines, repaired tails, and the compact resume state."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
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


def latest(out: Path) -> dict[str, dict[str, Any]]:
    """item_id -> its last record (the one that counts). Holds every record: for reports, not resume."""
    return {rec["item_id"]: rec for rec in iter_records(out)}


def image_intact(out: Path, rec: dict[str, Any], full: bool = False) -> bool:
    """Is the record's image there and whole? Size and mtime as recorded are trusted (like rsync);
    otherwise, or with `full`, the sha256 decides."""
    rel = rec.get("image_path")
    if not isinstance(rel, str):
        return False
    path = out / rel
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != rec.get("bytes"):
        return False
    if not full and st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    return sha256_file(path) == rec.get("sha256")


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
    records: int = 0
    bad_lines: int = 0

    def known(self, key: int) -> bool:
        return key in self.done or key in self.retryable or key in self.permanent or key in self.bad_images

    @property
    def known_count(self) -> int:
        return len(self.done) + len(self.retryable) + len(self.permanent) + len(self.bad_images)


def scan(out: Path, full_verify: bool = False, image_sizes: dict[str, int] | None = None) -> ResumeState:
    """Resolve the latest record per item and check the images of the ok ones.

    `image_sizes` ({image_path: size}, from a remote listing) replaces the local file check."""
    state = ResumeState()
    bad: list[int] = []
    for rec in iter_records(out, bad):
        state.records += 1
        cost = rec.get("cost_usd")
        if isinstance(cost, (int, float)):
            state.spent_usd += cost
        try:
            key = int(rec["item_id"], 16)
        except ValueError:
            continue
        for s in (state.done, state.retryable, state.permanent, state.bad_images):
            s.discard(key)
        if rec.get("status") == "ok":
            if image_sizes is None:
                intact = image_intact(out, rec, full_verify)
            else:
                intact = image_sizes.get(rec.get("image_path") or "") == rec.get("bytes")
            (state.done if intact else state.bad_images).add(key)
        else:
            kind = (rec.get("error") or {}).get("kind")
            (state.permanent if kind in PERMANENT else state.retryable).add(key)
    state.bad_lines = len(bad)
    return state
