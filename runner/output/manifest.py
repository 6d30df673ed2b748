"""Read what a run wrote: manifest lines, repaired tails, damaged lines set aside, and the compact resume state."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..imageinfo import dimensions_of_file
from ..policy import PERMANENT
from ..record import Intact, Record, parse_line, supersedes
from .files import Jail, open_regular, output_error
from .ledger import Ledger

MANIFEST = "manifest.jsonl"
IMAGE_FILE = re.compile(r"([0-9a-f]{20})(?:-\d+)?\.(?:png|jpg|webp|gif)")  # images/ab/<item_id>[-n].<ext>
SPEC_SNAPSHOT = "spec.json"
TORN_SUFFIX = ".torn"  # manifest.jsonl.torn: cut-off and damaged lines set aside


def manifest_name(shard_label: str | None) -> str:
    return MANIFEST if shard_label is None else f"manifest.shard-{shard_label}.jsonl"


def manifest_paths(out: Path) -> list[Path]:
    """Every manifest in an output dir: the plain one and one per shard (and remote parts).

    A link or a non-regular file under a manifest's name is an error, not something to read."""
    try:
        entries = list(os.scandir(out))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise output_error(e, str(out)) from None
    found = []
    for entry in entries:
        if not (entry.name.startswith("manifest") and entry.name.endswith(".jsonl")):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise OutputError(
                f"{entry.path} is a symbolic link or not a regular file; runner reads and writes only its own "
                "files in an output dir: remove it"
            )
        found.append(Path(entry.path))
    return sorted(found)


def read_snapshot(out: Path) -> dict[str, Any]:
    """What the output dir remembers of the spec it last ran (spec.json), or {}."""
    try:
        with os.fdopen(open_regular(out / SPEC_SNAPSHOT), "rb") as f:
            obj = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _lines(path: Path) -> Iterator[bytes]:
    with os.fdopen(open_regular(path), "rb") as f:
        yield from f


def iter_records(out: Path, bad: list[int] | None = None) -> Iterator[Record]:
    """Every valid manifest line in file order; damaged ones (any shape) are counted in `bad`."""
    for path in manifest_paths(out):
        yield from _records(path, bad)


def shard_of(path: Path) -> tuple[int, int] | None:
    """(K, N) of a shard's manifest (or of a remote part of one), None for an unsharded run's."""
    m = re.match(r"manifest\.shard-(\d+)-of-(\d+)[.]", path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_records(path: Path, bad: list[int] | None = None) -> Iterator[Record]:
    """The valid lines of one manifest file; damaged ones are counted in `bad`."""
    return _records(path, bad)


def _records(path: Path, bad: list[int] | None = None) -> Iterator[Record]:
    for line in _lines(path):
        rec = parse_line(line)
        if rec is not None:
            yield rec
        elif line.strip() and bad is not None:
            bad.append(1)


def repair(jail: Jail, name: str) -> int:
    """Cut a torn last line (a kill mid-write) off the manifest and keep it aside; bytes moved."""
    if jail.lstat(name) is None:
        return 0
    fd = jail.open(name, os.O_RDWR)
    with os.fdopen(fd, "rb+") as f:
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
        set_aside(jail, name, [tail])
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        return len(tail)


def set_aside(jail: Jail, name: str, lines: list[bytes]) -> None:
    """Append lines to `<manifest>.torn`, durably: they are evidence, never silently lost."""
    fd = jail.open(name + TORN_SUFFIX, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "ab") as aside:
        aside.write(b"".join(line.rstrip(b"\n") + b"\n" for line in lines))
        aside.flush()
        os.fsync(aside.fileno())


# The resume index: beside each manifest, `.manifest.jsonl.idx` holds one tab-separated line
# per record with only what resume needs, and the manifest's size after that record. Parsing
# it is several times faster than parsing the JSON; it is a cache, trusted only while its last
# offset equals the manifest's size, and rebuilt from the manifest otherwise.
_INDEX_FIELDS = ("item_id", "status", "kind", "image_path", "bytes", "mtime_ns", "sha256", "cost_usd")


def index_name(manifest: str) -> str:
    return f".{manifest}.idx"


def index_lines(records: list[Record], start: int, lengths: list[int]) -> bytes:
    """Index lines for records whose manifest lines of `lengths` bytes begin at offset `start`."""
    out = []
    end = start
    for rec, length in zip(records, lengths, strict=True):
        end += length
        kind = rec["error"]["kind"] if "error" in rec else ""
        fields = (rec["item_id"], rec["status"], kind, rec.get("image_path") or "", rec.get("bytes") or "",
                  rec.get("mtime_ns") or "", rec.get("sha256") or "", float(rec.get("cost_usd") or 0), end)  # fmt: skip
        out.append("\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields))
    return ("\n".join(out) + "\n").encode() if out else b""


def index_valid(manifest: Path) -> bool:
    """Is the index beside `manifest` complete? A missing, stale or non-regular index is not."""
    try:
        size = manifest.stat().st_size
        with os.fdopen(open_regular(manifest.with_name(index_name(manifest.name))), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except OSError:
        return False
    return tail.rsplit(b"\t", 1)[-1] == str(size).encode() if tail else size == 0


def rebuild_index(jail: Jail, name: str, durable: bool) -> int:
    """Write the manifest's index afresh (after a crash, a repair or an older runner).

    Lines that are not valid records (hand-edited, damaged) are set aside in `.torn` and
    the manifest is rewritten without them, so no later run trips on them; returns how many.
    Streams: memory stays flat whatever the manifest's size."""
    damaged = _write_index(jail, name)
    if damaged:
        set_aside(jail, name, damaged)
        with (
            os.fdopen(jail.open(name, os.O_RDONLY), "rb") as src,
            jail.atomic(name, durable) as fd,
            os.fdopen(os.dup(fd), "wb") as dst,
        ):
            for line in src:
                if parse_line(line) is not None:
                    dst.write(line)
        if durable:
            jail.sync_dir("")
        _write_index(jail, name)
    return len(damaged)


def _write_index(jail: Jail, name: str) -> list[bytes]:
    """Index every valid line of the manifest; return the damaged lines (the index is then moot)."""
    damaged: list[bytes] = []
    offset = 0
    with (
        os.fdopen(jail.open(name, os.O_RDONLY), "rb") as src,
        jail.atomic(index_name(name), False) as fd,
        os.fdopen(os.dup(fd), "wb") as dst,
    ):
        for line in src:
            start, offset = offset, offset + len(line)
            rec = parse_line(line)
            if rec is not None:
                dst.write(index_lines([rec], start, [len(line)]))
            elif line.strip():
                damaged.append(line)
    return damaged


def _index_rows(manifest: Path) -> Iterator[dict[str, Any]]:
    with os.fdopen(open_regular(manifest.with_name(index_name(manifest.name))), encoding="utf-8") as f:
        for line in f:
            try:
                item_id, status, kind, rel, size, mtime, sha, cost, _ = line.split("\t")
                row = {
                    "item_id": item_id, "status": status, "error": {"kind": kind} if kind else None,
                    "image_path": rel or None, "bytes": int(size) if size else None,
                    "mtime_ns": int(mtime) if mtime else None, "sha256": sha or None, "cost_usd": float(cost),
                }  # fmt: skip
            except ValueError:  # a row edited by hand: its item counts as unrecorded (run again or recovered)
                continue
            yield row


def image_intact(out: Path | str, rec: Mapping[str, Any], full: bool = False) -> bool:
    """Is the record's image there and whole? Size and mtime as recorded are trusted (like rsync);
    otherwise, or with `full`, the sha256 decides (and with `full`, a header that says the image's
    size must be there too). A link is never an intact image."""
    rel = rec.get("image_path")
    if not isinstance(rel, str):
        return False
    path = f"{out}{os.sep}{rel}"  # a plain string: a Path per image made resume twice as slow
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != rec.get("bytes"):
        return False
    if not full and st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    try:
        same = sha256_file(path) == rec.get("sha256")
    except OSError:
        return False
    # --verify: bytes that only look like an image (no header that says its size) are not one either
    return same and (not full or dimensions_of_file(path) is not None)


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
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
    in_batch: set[int] = field(default_factory=set)  # submitted in a batch still open (output/ledger.py)
    # Edit chains only (scan's keep_images): a done item's image (sha256, path, bytes), its children's input.
    images: dict[int, tuple[str, str, int]] = field(default_factory=dict)
    spent_usd: float = 0.0
    committed_usd: float = 0.0  # what open batches may still cost (counted by the budget from submission)
    bad_lines: int = 0

    def pending(self, key: int, retry_failed: bool) -> bool:
        """Will a run send this item? Not if done, nor if it failed permanently (unless retried), nor
        if it is in an open batch (it is collected, never submitted twice)."""
        return key not in self.done and (retry_failed or key not in self.permanent) and key not in self.in_batch

    def add_ledger(self, ledger: Ledger) -> None:
        """Fold in what the batch ledger says is submitted and not yet collected."""
        self.in_batch = ledger.in_batch()
        self.committed_usd = ledger.committed_usd()

    def known(self, key: int) -> bool:
        return key in self.done or key in self.retryable or key in self.permanent or key in self.bad_images

    def known_count(self, owns: Callable[[int], bool] | None = None) -> int:
        """How many items have records (of one shard, with `owns`)."""
        sets = (self.done, self.retryable, self.permanent, self.bad_images)
        if owns is None:
            return sum(map(len, sets))
        return sum(1 for s in sets for key in s if owns(key))


def scan(out: Path, intact: Intact, keep_images: bool = False) -> ResumeState:
    """Resolve the record that counts per item (record.supersedes, the one rule) and sort the items
    into done, bad image, retryable and permanent; `intact` checks an ok record's image. With
    `keep_images` (an edit chain: children are planned from their parents' images), what a done
    item's image is, too."""
    state = ResumeState()
    bad: list[int] = []
    rows = (rec for p in manifest_paths(out) for rec in (_index_rows(p) if index_valid(p) else _records(p, bad)))
    for rec in rows:
        try:
            key = int(rec["item_id"], 16)
        except ValueError:  # an index row edited by hand
            continue
        state.spent_usd += rec["cost_usd"] if isinstance(rec.get("cost_usd"), (int, float)) else 0.0
        if state.known(key):
            old = "ok" if key in state.done or key in state.bad_images else "failed"
            if not supersedes(rec.get("status", ""), old, lambda: key in state.done):  # noqa: B023
                continue
            for s in (state.done, state.retryable, state.permanent, state.bad_images):
                s.discard(key)
            state.images.pop(key, None)
        if rec.get("status") == "ok":
            whole = intact(rec)
            (state.done if whole else state.bad_images).add(key)
            if whole and keep_images:
                state.images[key] = (str(rec.get("sha256")), str(rec.get("image_path")), int(rec.get("bytes") or 0))
        else:
            kind = (rec.get("error") or {}).get("kind")
            (state.permanent if kind in PERMANENT else state.retryable).add(key)
    state.bad_lines = len(bad)
    return state
