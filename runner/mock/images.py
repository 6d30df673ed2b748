"""The mock gateway's images: deterministic PNGs (stdlib), JPEG/WebP via Pillow, and a cache of finished data URIs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

from ..models import pixel_size

MIME_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_SIDE = 8
# Ancillary, private, safe-to-copy: every decoder must skip it without complaint.
PAD_CHUNK = b"paDd"
# Rows are computed per 8-pixel cell and only for a few dozen distinct rows: pure Python stays
# fast even at 4K, and the deflate input is highly repetitive.
_CELL = 8
_LEVELS = 48
_SHIFTS = [bytes((v + k) & 255 for v in range(256)) for k in range(256)]


def pillow_available() -> bool:
    """True when Pillow can be imported (needed for jpeg and webp output)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def scaled_size(model: str, aspect_ratio: str, image_size: str | None, scale: int) -> tuple[int, int]:
    """The mock's image size: the real pixel size integer-divided by `scale`, at least 8x8."""
    width, height = pixel_size(model, aspect_ratio, image_size)
    return max(MIN_SIDE, width // scale), max(MIN_SIDE, height // scale)


def _pattern(width: int, height: int, seed: bytes) -> list[tuple[bytes, int]]:
    """A seeded gradient-and-checker pattern as runs of identical raw RGB rows: (row, count)."""
    digest = hashlib.sha256(seed).digest()
    (r0, g0, b0), (r1, g1, b1) = digest[0:3], digest[3:6]
    period, flip, step = 2 + digest[6] % 7, 16 + digest[7] % 48, 1 + digest[8] % 4
    ncells = -(-width // _CELL)
    span = max(1, ncells - 1)
    even, odd = [], []
    for cx in range(ncells):
        s = cx / span
        rgb = (int(r0 + (r1 - r0) * s), int(g0 + (g1 - g0) * s), int(b0 + (b1 - b0) * s))
        flipped = bytes((rgb[0] ^ flip, rgb[1] ^ flip, rgb[2] ^ flip)) * _CELL
        plain = bytes(rgb) * _CELL
        even.append(flipped if (cx // period) % 2 else plain)
        odd.append(plain if (cx // period) % 2 else flipped)
    bases = (b"".join(even)[: width * 3], b"".join(odd)[: width * 3])
    # Rows change only where the vertical level or the checker parity does: walk those edges.
    levels, period_px = min(_LEVELS, max(2, height // 4)), period * _CELL
    edges = {-(-level * height // levels) for level in range(levels)} | set(range(0, height, period_px))
    starts = sorted(edges | {height})
    runs = []
    for start, end in itertools.pairwise(starts):
        # The vertical gradient is a per-level byte shift: bytes.translate does it at C speed.
        shift = _SHIFTS[(start * levels // height) * step & 255]
        runs.append((bases[(start // period_px) % 2].translate(shift), end - start))
    return runs


def _uniform(width: int, height: int, seed: bytes) -> list[tuple[bytes, int]]:
    """One colour, seeded: a single run of identical rows."""
    return [(hashlib.sha256(seed).digest()[:3] * width, height)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


def _encode_png(
    width: int, height: int, runs: list[tuple[bytes, int]], pad_bytes: int, text: Mapping[str, str]
) -> bytes:
    # A row equal to the one above is written with the Up filter: all zeros, which deflate
    # swallows at memory speed, so even a 4K image takes a few tens of milliseconds.
    same = b"\x02" + bytes(width * 3)
    compressor = zlib.compressobj(1)
    parts: list[bytes] = []
    batch: list[bytes] = []
    for row, count in runs:
        batch += (b"\x00", row, same * (count - 1))
        if len(batch) >= 48:
            parts.append(compressor.compress(b"".join(batch)))
            batch = []
    parts.append(compressor.compress(b"".join(batch)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [PNG_SIGNATURE, _chunk(b"IHDR", ihdr)]
    chunks += [_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")) for key, value in text.items()]
    if pad_bytes > 0:
        chunks.append(_chunk(PAD_CHUNK, bytes(pad_bytes)))
    chunks += [_chunk(b"IDAT", b"".join(parts)), _chunk(b"IEND", b"")]
    return b"".join(chunks)


def _jpeg_comments(data: bytes, pad_bytes: int) -> bytes:
    """Insert COM segments (at most 65533 bytes each) right after SOI."""
    segments = []
    while pad_bytes > 0:
        size = min(pad_bytes, 65533)
        segments.append(b"\xff\xfe" + struct.pack(">H", size + 2) + bytes(size))
        pad_bytes -= size
    return data[:2] + b"".join(segments) + data[2:]


def _encode_pillow(width: int, height: int, raw: bytes, mime: str, pad_bytes: int) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (width, height), raw)
    out = io.BytesIO()
    if mime == "jpeg":
        image.save(out, "JPEG", quality=85)
        return _jpeg_comments(out.getvalue(), pad_bytes)
    extra = {"xmp": bytes(pad_bytes)} if pad_bytes > 0 else {}
    image.save(out, "WEBP", quality=80, **extra)
    return out.getvalue()


def render_image(
    width: int,
    height: int,
    seed: bytes,
    mime: str = "png",
    pad_bytes: int = 0,
    *,
    uniform: bool = False,
    text: Mapping[str, str] | None = None,
) -> bytes:
    """A valid image of exactly width x height whose pixels depend only on `seed` (one colour if `uniform`);
    `text` becomes PNG tEXt chunks (latin-1 keys and values), ignored for the other formats."""
    if mime not in MIME_TYPES:
        raise ValueError(f"unsupported mime {mime!r}; expected one of {', '.join(MIME_TYPES)}")
    width, height = max(1, width), max(1, height)
    runs = (_uniform if uniform else _pattern)(width, height, seed)
    if mime == "png":
        return _encode_png(width, height, runs, pad_bytes, text or {})
    return _encode_pillow(width, height, b"".join(row * count for row, count in runs), mime, pad_bytes)


def not_an_image(seed: bytes) -> bytes:
    """Bytes no image decoder accepts, to put behind a data URI that claims to be an image."""
    return b"NOT-AN-IMAGE:" + hashlib.sha256(seed).digest() * 8


def data_uri(mime: str, data: bytes) -> bytes:
    """`data:image/...;base64,...` as ASCII bytes (safe inside a JSON string as is)."""
    return b"data:" + MIME_TYPES[mime].encode() + b";base64," + base64.b64encode(data)


class ImageCache:
    """Thread-safe LRU of finished data URIs, bounded by count and by total bytes."""

    def __init__(self, max_bytes: int = 256 << 20, max_items: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes or len(self._items) > self.max_items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)

    async def render(self, key: Hashable, make: Callable[[], bytes], big: bool) -> bytes:
        """The value kept under `key`, made and kept first if missing; a `big` one is made off the loop."""
        value = self.get(key)
        if value is None:
            # zlib releases the GIL: big images are encoded in a worker thread, small ones inline.
            value = await asyncio.get_running_loop().run_in_executor(None, make) if big else make()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    def __len__(self) -> int:
        return len(self._items)
