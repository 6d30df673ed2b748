"""Output dirs at an fsspec URL (s3://...): images and manifest parts written as immutable objects.

Object stores cannot append, lock or fsync, so a remote output dir works like this:
- each image is one object, written whole (an object appears complete or not at all);
- each batch of manifest lines is a new object `manifest[.shard-K-of-N].part-<run>-<seq>.jsonl`,
  written after its images, so every `manifest*.jsonl` object is complete and `ok` lines
  point at images that exist;
- a run, `estimate`, `report` and `export` first copy the manifests to a temporary local dir
  and list the image sizes; resume trusts an image whose size matches its record.
There is no lock: give each concurrent writer its own --shard.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import OutputError, UsageError
from .manifest import manifest_name
from .writer import SPEC_SNAPSHOT, OutputDir, records_lines

HINT = "remote output dirs need runner's optional s3 extra: pip install -e '.[s3]' in its checkout (fsspec and s3fs)"


def is_remote(target: str | Path) -> bool:
    text = str(target)
    return "://" in text and not text.startswith("file://")


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise UsageError(f"{url}: {HINT}") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UsageError(f"{url}: {e}; {HINT}") from None
    return fs, root.rstrip("/")


def _pull(fs: Any, root: str, dest: Path) -> dict[str, int]:
    """Copy manifests and the spec snapshot to `dest`; return {image path: size}."""
    for remote in [*fs.glob(f"{root}/manifest*.jsonl"), f"{root}/{SPEC_SNAPSHOT}"]:
        if remote.endswith(SPEC_SNAPSHOT) and not fs.exists(remote):
            continue
        fs.get_file(remote, str(dest / remote.rsplit("/", 1)[-1]))
    try:
        found = fs.find(f"{root}/images", detail=True)
    except FileNotFoundError:
        found = {}
    return {name[len(root) + 1 :]: int(info["size"]) for name, info in found.items()}


@contextmanager
def local_view(url: str) -> Iterator[tuple[Path, dict[str, int]]]:
    """A temporary local copy of a remote output dir's manifests, and its image sizes."""
    fs, root = _filesystem(url)
    with tempfile.TemporaryDirectory(prefix="runner-remote-") as tmp:
        try:
            sizes = _pull(fs, root, Path(tmp))
        except OSError as e:
            raise OutputError(f"cannot read output dir {url}: {e}") from None
        yield Path(tmp), sizes


class RemoteOutputDir(OutputDir):
    """An OutputDir whose images and manifest parts go to an fsspec URL."""

    def __init__(self, url: str, shard_label: str | None = None, durable: bool = True) -> None:
        self.fs, self.root = _filesystem(url)
        self._tmp = tempfile.TemporaryDirectory(prefix="runner-remote-")
        super().__init__(Path(self._tmp.name), shard_label, durable)
        self.display = url
        # Parts sort by name in time order: later runs' lines come later (see manifest.supersedes).
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._part = manifest_name(shard_label).removesuffix(".jsonl") + f".part-{stamp}-{uuid.uuid4().hex[:8]}"
        self._seq = 0

    def open(self) -> None:
        try:
            self.image_sizes = _pull(self.fs, self.root, self.path)
        except OSError as e:
            raise OutputError(f"cannot read output dir {self.display}: {e}") from None

    def close(self) -> None:
        self._tmp.cleanup()

    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]:
        self._put(rel, data)
        return hashlib.sha256(data).hexdigest(), None

    def append(self, records: list[dict[str, Any]]) -> None:
        self._seq += 1
        self._put(f"{self._part}-{self._seq:06d}.jsonl", b"".join(records_lines(records)))

    def write_snapshot(self, summary: dict[str, Any]) -> None:
        self._put(SPEC_SNAPSHOT, json.dumps(summary, indent=2).encode())

    def _put(self, name: str, data: bytes) -> None:
        """One whole object: it appears complete or not at all."""
        try:
            self.fs.pipe_file(f"{self.root}/{name}", data)
        except OSError as e:
            raise OutputError(f"cannot write to output dir {self.display}: {e}") from None


def open_output(target: str | Path, shard_label: str | None, durable: bool) -> OutputDir:
    if is_remote(target):
        return RemoteOutputDir(str(target), shard_label, durable)
    return OutputDir(Path(target), shard_label, durable)


def write_remote(url: str, name: str, local: Path) -> str:
    """Upload one file into a remote output dir (used by export)."""
    fs, root = _filesystem(url)
    fs.put_file(str(local), f"{root}/{name}")
    return f"{url.rstrip('/')}/{name}"
