"""Perceptual hashes of images (64-bit dHash, Pillow), their cache file, and near pairs without all pairs.

dHash: the image shrunk to 9x8 grey pixels, one bit per horizontally adjacent pair (is the left
one brighter). Re-encoding, resizing and small edits move few bits; different pictures differ in
about half. The same pass tells whether the image is a single colour.

Near pairs by multi-index hashing: two 64-bit hashes within Hamming distance t agree exactly on
at least one of t+1 disjoint bands of bits (pigeonhole), so only hashes that share a band value
are compared. At 100,000 images and t = 4 that is a few million comparisons, not five billion.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from ..output.files import append_file, atomic_file, open_regular
from ..output.source import ImageSource

CACHE_HEADER = "# runner perceptual-hash cache v1: sha256 dhash64 uniform\n"
UNIFORM_TOLERANCE = 2  # levels per channel: a flat colour survives JPEG with a level or two of noise
MAX_THRESHOLD = 32
_BATCH = 64  # images per job sent to a worker process
_WINDOW = 512  # fewer misses than this are hashed in this process (starting workers costs a second)


class ImageHash(NamedTuple):
    dhash: int
    uniform: bool


def pillow_missing() -> str | None:
    """None when Pillow can be imported, else why not (the message to show)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return "Pillow is not installed"
    return None


def hash_bytes(data: bytes) -> ImageHash:
    """The dHash and the single-colour flag of an encoded image. Raises on what Pillow cannot decode."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (64, 64))  # JPEG decodes at 1/2..1/8 scale: enough for 9x8
        opened.load()
        im: Image.Image = opened
        if im.mode not in ("L", "RGB", "RGBA", "LA"):
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        extrema = im.getextrema()
        bands = [extrema] if im.mode == "L" else extrema
        uniform = all(hi - lo <= UNIFORM_TOLERANCE for lo, hi in bands)  # type: ignore[misc, operator]
        small = im.resize((9, 8), Image.Resampling.BOX).convert("L").tobytes()
    bits = 0
    for row in range(0, 72, 9):
        for col in range(row, row + 8):
            bits = (bits << 1) | (small[col] > small[col + 1])
    return ImageHash(bits, uniform)


def _hash_file(source: ImageSource, rel: str, sha256: str) -> ImageHash | None:
    """Hash one image; None when it is missing, not what its record says (sha256), or not decodable."""
    try:
        with source.open(rel) as f:
            data = f.read()
    except OSError:
        return None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return None  # never cache a hash under a sha256 it does not belong to
    try:
        return hash_bytes(data)
    except Exception:  # Pillow raises many types on hostile input (and DecompressionBombError)
        return None


class HashCache:
    """sha256 -> ImageHash, loaded from and appended to a small text file (one line per image)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, ImageHash] = {}
        self._new: list[str] = []
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            f = io.TextIOWrapper(os.fdopen(open_regular(path), "rb"), encoding="ascii", errors="replace")
        except OSError:
            return
        with f:
            if f.readline() != CACHE_HEADER:
                return  # another version or not ours: start over (rewritten on save)
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3 or len(parts[0]) != 64 or len(parts[1]) != 16 or parts[2] not in ("0", "1"):
                    continue  # a torn or damaged line: that image is hashed again
                try:
                    self.known[parts[0]] = ImageHash(int(parts[1], 16), parts[2] == "1")
                except ValueError:
                    continue

    def add(self, sha256: str, value: ImageHash) -> None:
        if sha256 not in self.known:
            self.known[sha256] = value
            self._new.append(sha256)

    def save(self) -> None:
        """Append the new hashes (the whole file afresh if it was missing or not ours)."""
        if self.path is None or not self._new:
            return
        fresh = not self._valid_file()
        lines = self.known if fresh else self._new
        text = "".join(f"{sha}\t{self.known[sha].dhash:016x}\t{int(self.known[sha].uniform)}\n" for sha in lines)
        if fresh:
            with atomic_file(self.path, durable=False) as out:
                out.write((CACHE_HEADER + text).encode("ascii"))
        else:
            with append_file(self.path) as f:
                f.write(text.encode("ascii"))
        self._new = []

    def _valid_file(self) -> bool:
        assert self.path is not None
        try:
            with os.fdopen(open_regular(self.path), "rb") as f:
                if f.readline() != CACHE_HEADER.encode():
                    return False
                f.seek(0, os.SEEK_END)
                if f.tell() > len(CACHE_HEADER):
                    f.seek(-1, os.SEEK_END)
                    return f.read(1) == b"\n"  # a torn tail would glue onto the next line
                return True
        except OSError:
            return False


def hash_images(
    wanted: Iterable[tuple[str, str]], source: ImageSource, cache: HashCache, workers: int | None = None
) -> Iterator[tuple[str, ImageHash | None]]:
    """(sha256, hash or None) for each (sha256, relative path) wanted, from the cache or by reading the image.

    A few misses are hashed here; past a window of them, batches go to worker processes (one
    per core: Pillow's Python side holds the GIL, so threads gain little on small images),
    a bounded number in flight, so memory stays flat however many images there are. Cached
    hashes come first; the order of the answers is not the order asked."""
    workers = workers or os.cpu_count() or 1
    pool: ProcessPoolExecutor | None = None
    misses: list[tuple[str, str]] = []
    in_flight: deque[tuple[list[tuple[str, str]], Future[list[ImageHash | None]]]] = deque()

    def answers(jobs: list[tuple[str, str]], values: list[ImageHash | None]) -> Iterator[tuple[str, ImageHash | None]]:
        for (sha, _), value in zip(jobs, values, strict=True):
            if value is not None:
                cache.add(sha, value)
            yield sha, value

    try:
        for sha, rel in wanted:
            known = cache.known.get(sha)
            if known is not None:
                yield sha, known
                continue
            misses.append((sha, rel))
            if pool is None and len(misses) >= _WINDOW and workers > 1:
                pool = _start_pool(source, workers)
            if pool is not None and len(misses) >= _BATCH:
                in_flight.append((misses, pool.submit(_hash_jobs, misses)))
                misses = []
                while len(in_flight) > workers * 4:
                    jobs, future = in_flight.popleft()
                    yield from answers(jobs, future.result())
        while in_flight:
            jobs, future = in_flight.popleft()
            yield from answers(jobs, future.result())
        yield from answers(misses, [_hash_file(source, rel, sha) for sha, rel in misses])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


_worker_source: ImageSource | None = None


def _init_worker(source: ImageSource) -> None:
    global _worker_source
    _worker_source = source


def _hash_jobs(jobs: list[tuple[str, str]]) -> list[ImageHash | None]:
    assert _worker_source is not None
    return [_hash_file(_worker_source, rel, sha) for sha, rel in jobs]


def _start_pool(source: ImageSource, workers: int) -> ProcessPoolExecutor | None:
    """Worker processes that each hold `source`; None when it cannot be sent to them (not picklable)."""
    try:
        pickle.dumps(source)
    except Exception:
        return None
    # spawn, not fork: the caller may have threads (a fork would copy their locks mid-use)
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(source,)
    )


def near_pairs(hashes: list[int], threshold: int) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) of `hashes` (distinct 64-bit values) within Hamming distance `threshold`.

    Multi-index hashing: split the bits into threshold+1 bands; a near pair agrees on one band.
    A pair that agrees on several bands may come out more than once."""
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"near threshold must be 0..{MAX_THRESHOLD} bits, got {threshold}")
    bands = threshold + 1
    widths = [64 // bands + (1 if b < 64 % bands else 0) for b in range(bands)]
    shift = 0
    for width in widths:
        mask = (1 << width) - 1
        buckets: dict[int, list[int]] = {}
        for i, h in enumerate(hashes):
            key = (h >> shift) & mask
            bucket = buckets.get(key)
            if bucket is None:
                buckets[key] = [i]
            else:
                bucket.append(i)
        shift += width
        for members in buckets.values():
            if len(members) < 2:
                continue
            values = [hashes[i] for i in members]
            for a in range(len(members) - 1):
                ha = values[a]
                for b in range(a + 1, len(members)):
                    if (ha ^ values[b]).bit_count() <= threshold:
                        yield members[a], members[b]
