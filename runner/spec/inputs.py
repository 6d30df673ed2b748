"""Reference images: resolve spec paths and URLs, check them, hash them once, encode them on demand."""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# What Gemini accepts as an input image (shared/nanobanana-api.md), told by magic bytes, not names.
MAX_INPUTS = {"nanobanana": 3, "nanobanana_pro": 14, "nanobanana_2": 14}
MAX_REQUEST_BYTES = 20 * 1024 * 1024  # the whole request body, as Google caps it
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/heic": "heic", "image/heif": "heif"}
_MAX_REFS = 100_000
_HEIF_BRANDS = {b"heic": "image/heic", b"heix": "image/heic", b"heim": "image/heic", b"heis": "image/heic",
                b"mif1": "image/heif", b"msf1": "image/heif", b"heif": "image/heif"}  # fmt: skip


class InputError(ValueError):
    """A reference image that cannot be used; the spec checker names the key around it."""


def sniff(head: bytes) -> str | None:
    """The image type of a file from its first bytes, if Gemini takes it."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(head[8:12])
    return None


@dataclass(frozen=True, slots=True)
class InputImage:
    """One reference image: a local file (hashed) or a URL (sent as it is, identified by its text)."""

    ref: str  # as the spec names it: a path relative to the spec file, or a URL
    path: str | None = None  # the file, resolved
    url: str | None = None
    sha256: str | None = None
    mime: str | None = None
    size: int = 0
    parent: str | None = None  # an edit chain: the item_id whose image this is...
    image_path: str | None = None  # ...and where that image is in the output dir

    @property
    def key(self) -> str:
        """What the item id hashes: the bytes for a file (a parent's image too), the text for a URL."""
        return f"url:{self.url}" if self.url is not None else f"sha256:{self.sha256}"

    @property
    def stored(self) -> str | None:
        """Where the output dir keeps its copy (content-addressed, so each file is stored once; a
        parent's image is its own image file)."""
        if self.image_path is not None:
            return self.image_path
        if self.sha256 is None or self.mime is None:
            return None
        return f"inputs/{self.sha256[:2]}/{self.sha256}.{EXTENSIONS.get(self.mime, 'png')}"

    @property
    def request_bytes(self) -> int:
        """What it adds to a request body: base64 of the bytes, or the URL."""
        return len(self.url) if self.url is not None else (self.size + 2) // 3 * 4 + 32


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


class Inputs:
    """Resolves image references once and caches what it learned.

    Metadata (hash, type, size) is cached for every image seen; encoded data URIs are cached
    by total size, so an image used by 10,000 items is read and encoded once, and thousands of
    different images are never all in memory."""

    def __init__(self, base: Path, max_cached_bytes: int = 256 << 20) -> None:
        self.base = base
        # How a run reads an image of its own output dir (an edit chain's parent image): set by the run.
        self.reader: Callable[[str], bytes | None] | None = None
        self._meta: OrderedDict[str | tuple[str, str], tuple[InputImage, ...]] = OrderedDict()
        self._fallbacks: dict[tuple[str, str], bool] = {}
        self._uris: OrderedDict[str, str] = OrderedDict()
        self._uri_bytes = 0
        self._max = max_cached_bytes
        self._lock = threading.Lock()

    def resolve(self, ref: str, base: Path | None = None) -> tuple[InputImage, ...]:
        """The images a reference names (a glob names several, sorted), a path relative to `base` (the
        spec's folder unless given); InputError if unusable."""
        key: str | tuple[str, str] = ref if base is None or base == self.base else (str(base), ref)
        found = self._meta.get(key)
        if found is None:
            found = self._meta[key] = self._resolve(ref, self.base if base is None else base)
            if len(self._meta) > _MAX_REFS:  # a prompt file naming a million images: forget the oldest
                self._meta.popitem(last=False)
        return found

    def resolve_in_file(self, ref: str, folder: Path) -> tuple[tuple[InputImage, ...], bool]:
        """The images a reference in a prompt file names: relative to the file's `folder`, or, where only
        that exists, to the spec's (as before paths in prompt files were read so); True then."""
        key = (str(folder), ref)
        fallback = self._fallbacks.get(key)
        if fallback is None:
            fallback = self._fallbacks[key] = self._only_beside_spec(ref, folder)
            if len(self._fallbacks) > _MAX_REFS:
                self._fallbacks.clear()
        return self.resolve(ref, self.base if fallback else folder), fallback

    def _only_beside_spec(self, ref: str, folder: Path) -> bool:
        if folder == self.base or not isinstance(ref, str) or "://" in ref or not ref.strip():
            return False

        def there(base: Path) -> bool:
            if glob.has_magic(ref):
                return bool(glob.glob(ref, root_dir=base))
            return (base / ref).exists()

        return not there(folder) and there(self.base)

    def _resolve(self, ref: str, base: Path) -> tuple[InputImage, ...]:
        if not isinstance(ref, str) or not ref.strip():
            raise InputError("expected a path or an http(s) URL")
        if ref.startswith("@"):
            raise InputError(f"{ref!r}: @ID (another prompt's images) works in the images of a prompt under `prompts`")
        if is_url(ref):
            parts = urlsplit(ref)
            if not parts.hostname or any(c.isspace() for c in ref) or parts.username or parts.password:
                raise InputError(f"{ref!r}: not a usable http(s) URL (host, no spaces, no user:password)")
            return (InputImage(ref, url=ref),)
        if "://" in ref:
            raise InputError(f"{ref!r}: only local files and http(s) URLs can be sent")
        full = base / ref
        if glob.has_magic(ref):
            # The pattern is matched inside the base folder, whose own name may hold [ or *.
            paths = sorted(glob.glob(ref, root_dir=base))
            if not paths:
                raise InputError(f"{ref!r}: the pattern matches no file (in {base})")
            return tuple(self._file(p, base / p) for p in paths)
        return (self._file(ref, full),)

    def _file(self, ref: str, path: Path) -> InputImage:
        try:
            with path.open("rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise InputError(f"{path}: not a regular file")
                head = f.read(64)
                mime = sniff(head)
                if mime is None:
                    raise InputError(f"{path}: not a png, jpeg, webp, heic or heif image (by its first bytes)")
                h = hashlib.sha256(head)
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            raise InputError(f"file not found: {path}") from None
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        return InputImage(ref, path=str(path), sha256=h.hexdigest(), mime=mime, size=st.st_size)

    def read(self, image: InputImage) -> bytes:
        """The bytes of a local reference image (or a parent's image in the output dir), checked
        against the sha256 its item id was made from; InputError when it changed or went away."""
        if image.image_path is not None:
            data = self.reader(image.image_path) if self.reader is not None else None
            if data is None:
                raise InputError(f"{image.image_path} (the image of item {image.parent}) is gone from the output dir")
            where = image.image_path
        else:
            assert image.path is not None
            try:
                data = Path(image.path).read_bytes()
            except OSError as e:
                raise InputError(f"cannot read {image.path}: {e.strerror or e}") from None
            where = image.path
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise InputError(f"{where} changed since its item was planned; rerun to send the new one")
        return data

    def data_uri(self, image: InputImage) -> str:
        """What a request carries for this image: the URL, or the file as a data: URI.

        Raises InputError when the file changed since it was checked (its hash is in the item id)."""
        if image.url is not None:
            return image.url
        assert image.sha256 is not None
        with self._lock:
            uri = self._uris.get(image.sha256)
            if uri is not None:
                self._uris.move_to_end(image.sha256)
                return uri
        data = self.read(image)
        uri = f"data:{image.mime};base64,{base64.b64encode(data).decode('ascii')}"
        with self._lock:
            if len(uri) <= self._max // 4:
                self._uris[image.sha256] = uri
                self._uri_bytes += len(uri)
                while self._uri_bytes > self._max:
                    _, old = self._uris.popitem(last=False)
                    self._uri_bytes -= len(old)
        return uri


def check_request(model: str, prompt: str | int, images: tuple[InputImage, ...]) -> str | None:
    """Why the gateway would refuse this request before it is sent, or None (`prompt`: its text,
    or the most bytes it can take, for a template)."""
    limit = MAX_INPUTS[model]
    if len(images) > limit:
        return f"{len(images)} reference images; {model} takes at most {limit}"
    text = prompt if isinstance(prompt, int) else len(prompt.encode("utf-8", "replace"))
    size = text + 1024 + sum(i.request_bytes for i in images)
    if size > MAX_REQUEST_BYTES:
        biggest = max(images, key=lambda i: i.request_bytes)
        return (
            f"the request would be {size / 2**20:.1f} MiB, over the 20 MiB cap "
            f"(largest image {biggest.ref}: {biggest.size / 2**20:.1f} MiB)"
        )
    return None
