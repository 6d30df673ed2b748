"""Write a run's results: images made durable first, then their manifest lines, under a lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import OutputError, OutputLocked
from .manifest import index_lines, index_path, index_valid, manifest_name, rebuild_index, repair

SPEC_SNAPSHOT = "spec.json"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class OutputDir:
    """The output directory of one run (one shard): lock, images, manifest.

    Durability: an image is written to a temp file, fsynced, renamed into place and its
    folder fsynced before its manifest line is written; manifest lines are written in
    batches, each flushed and fsynced. With `durable=False` the fsyncs are skipped: a
    killed process still loses nothing (the kernel has the bytes), a power cut may.
    """

    def __init__(self, path: Path, shard_label: str | None = None, durable: bool = True) -> None:
        self.path = path
        self.display = str(path)  # how messages name it (a URL for remote output dirs)
        self.image_sizes: dict[str, int] | None = None  # remote dirs: resume checks sizes, not files
        self.durable = durable
        self.manifest_path = path / manifest_name(shard_label)
        self.shard_label = shard_label
        self._lock_fds: list[int] = []
        self._manifest: Any = None
        self._index: Any = None
        self._dirs_made: set[Path] = set()
        self.repaired_bytes = 0

    def open(self) -> None:
        try:
            (self.path / "images").mkdir(parents=True, exist_ok=True)
            self._lock()
            self.repaired_bytes = repair(self.manifest_path)
            if self.manifest_path.exists() and not index_valid(self.manifest_path):
                rebuild_index(self.manifest_path)
            self._manifest = self.manifest_path.open("ab", buffering=0)  # our writes go straight to the file
            self._index = index_path(self.manifest_path).open("ab")
        except OSError as e:
            self.close()
            raise _output_error(e, self.path) from None

    def _lock(self) -> None:
        """One writer per manifest. flock is released by the kernel when the process dies, so a
        crash never leaves a lock stuck. Shards share `.lock` (an unsharded run takes it alone,
        so it never runs beside shards) and each holds its own shard's lock alone."""
        if self.shard_label is None:
            self._take(".lock", fcntl.LOCK_EX, "another runner (or --shard runs)")
        else:
            self._take(".lock", fcntl.LOCK_SH, "an unsharded runner")
            self._take(f".lock.shard-{self.shard_label}", fcntl.LOCK_EX, f"another runner of shard {self.shard_label}")

    def _take(self, name: str, mode: int, who: str) -> None:
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder else ""
            raise OutputLocked(
                f"{self.path} is in use by {who}{pid}; wait for it to finish or choose another --out"
            ) from None
        if mode == fcntl.LOCK_EX:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fds.append(fd)

    def close(self) -> None:
        for f in (self._manifest, self._index):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._manifest = self._index = None
        while self._lock_fds:
            os.close(self._lock_fds.pop())

    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]:
        """Write one image atomically; returns (sha256, mtime_ns). Runs in a worker thread."""
        path = self.path / rel
        folder = path.parent
        try:
            if folder not in self._dirs_made:
                folder.mkdir(parents=True, exist_ok=True)
                self._dirs_made.add(folder)
            tmp = folder / f".{path.name}.{os.getpid()}.tmp"
            with tmp.open("wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.durable:
                _fsync_dir(folder)
            return hashlib.sha256(data).hexdigest(), path.stat().st_mtime_ns
        except OSError as e:
            raise _output_error(e, self.path) from None

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append manifest lines as one write, then flush (and fsync): a batch commit.

        The resume index follows, unsynced: it is a cache that a crash can leave behind,
        and the next run rebuilds it from the manifest then."""
        lines = records_lines(records)
        payload = b"".join(lines)
        try:
            start = self._manifest.tell()
            written = self._manifest.write(payload)
            if written != len(payload):
                raise OSError(errno.ENOSPC, "short write", str(self.manifest_path))
            if self.durable:
                os.fsync(self._manifest.fileno())
            self._index.write(index_lines(records, start, [len(line) for line in lines]))
            self._index.flush()
        except OSError as e:
            raise _output_error(e, self.path) from None

    def read_snapshot(self) -> dict[str, Any] | None:
        try:
            obj = json.loads((self.path / SPEC_SNAPSHOT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def write_snapshot(self, summary: dict[str, Any]) -> None:
        tmp = self.path / f".{SPEC_SNAPSHOT}.{os.getpid()}.tmp"  # shards write it at the same time
        try:
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
            os.replace(tmp, self.path / SPEC_SNAPSHOT)
        except OSError as e:
            raise _output_error(e, self.path) from None


def records_lines(records: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]


def image_relpath(item_id: str, mime: str, index: int = 0) -> str:
    """images/ab/<item_id>.png: 256 folders, so none holds a million files."""
    suffix = f"-{index}" if index else ""
    return f"images/{item_id[:2]}/{item_id}{suffix}.{EXTENSIONS.get(mime, 'bin')}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _output_error(e: OSError, out: Path) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why = "the disk is full (or a file-size quota was reached)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "no permission to write there"
    else:
        why = e.strerror or str(e)
    return OutputError(
        f"cannot write to output dir {out}: {why} ({getattr(e, 'filename', None) or out}); the run stopped, what was written is intact"
    )
