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
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import OutputError, UsageError
from ..record import Record
from .ledger import Ledger, encode_event, ledger_name, ledger_paths, read_ledger
from .manifest import IMAGE_FILE, SPEC_SNAPSHOT, ResumeState, manifest_name, read_snapshot, scan

VERIFY_THREADS = 16  # objects read at once by --verify: an object store is latency-bound, not bandwidth-bound
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


def pull(fs: Any, root: str, dest: Path) -> dict[str, int]:
    """Copy manifests and the spec snapshot to `dest`; return {image path: size}."""
    for remote in [*fs.glob(f"{root}/manifest*.jsonl"), *fs.glob(f"{root}/batches*.jsonl"), f"{root}/{SPEC_SNAPSHOT}"]:
        if remote.endswith(SPEC_SNAPSHOT) and not fs.exists(remote):
            continue
        fs.get_file(remote, str(dest / remote.rsplit("/", 1)[-1]))
    found: dict[str, Any] = {}
    for folder in ("images", "inputs"):
        with suppress(FileNotFoundError):
            found.update(fs.find(f"{root}/{folder}", detail=True))
    return {name[len(root) + 1 :]: int(info["size"]) for name, info in found.items()}


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


@contextmanager
def remote_view(url: str) -> Iterator[tuple[Path, RemoteSource]]:
    """A temporary local copy of a remote output dir's manifests, and its images."""
    fs, root = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="runner-remote-") as tmp:
        try:
            sizes = pull(fs, root, Path(tmp))
        except Exception as e:  # fsspec backends raise their own kinds (botocore's, say)
            raise OutputError(f"cannot read output dir {url}: {type(e).__name__}: {e}") from None
        yield Path(tmp), RemoteSource(fs, root, sizes)


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


class RemoteStore:
    """An output dir whose images and manifest parts go to an fsspec URL."""

    remote = True
    repaired_bytes = damaged_lines = removed_temps = 0

    def __init__(self, url: str, shard: tuple[int, int] | None = None, durable: bool = True) -> None:
        self.fs, self.root = filesystem(url)
        self._tmp = tempfile.TemporaryDirectory(prefix="runner-remote-")
        self.path = Path(self._tmp.name)
        self.display = url
        self.shard = shard
        label = f"{shard[0]}-of-{shard[1]}" if shard else None
        self.manifest_name = manifest_name(label)
        self.ledger_name = ledger_name(label)
        # Parts sort by name in time order: later runs' lines come later (see record.supersedes).
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._part = self.manifest_name.removesuffix(".jsonl") + f".part-{stamp}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self._events = 0
        self.source = RemoteSource(self.fs, self.root, {})

    def open(self) -> None:
        try:
            self.source.sizes = pull(self.fs, self.root, self.path)
        except Exception as e:  # fsspec backends raise their own kinds (botocore's, say)
            raise OutputError(f"cannot read output dir {self.display}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
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
        """One batch event as an object of its own (an object store cannot append): complete or absent.
        Names sort in time order, as the manifest parts do."""
        self._events += 1
        part = self.ledger_name.removesuffix(".jsonl") + self._part.removeprefix(
            self.manifest_name.removesuffix(".jsonl")
        )
        self._put(f"{part}-{self._events:06d}.jsonl", encode_event(event))

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

    def append(self, records: list[Record], lines: list[bytes]) -> None:
        self._seq += 1
        self._put(f"{self._part}-{self._seq:06d}.jsonl", b"".join(lines))

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
