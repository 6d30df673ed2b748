"""Pixel sizes from image headers, and the quality pass over output dirs written by hand."""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from runner.imageinfo import dimensions, dimensions_of_file, dimensions_of_stream, is_whole_image
from runner.quality import LocalSource, analyze, duplicate_groups
from runner.quality.phash import CACHE_HEADER, near_pairs

from .conftest import manifest_line

try:  # the mock's image module may move; Pillow covers the same formats if it does
    from runner.mock import render_image
except ImportError:  # pragma: no cover
    render_image = None  # type: ignore[assignment]

MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def picture(
    width: int, height: int, seed: int, fmt: str = "PNG", solid: tuple[int, int, int] | None = None, **save: Any
) -> bytes:
    """A real image: 8x6 random colour blocks scaled up (smooth enough for a stable dHash), or one colour."""
    if solid is not None:
        im = Image.new("RGB", (width, height), solid)
    else:
        rng = random.Random(seed)
        small = Image.new("RGB", (8, 6))
        small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])  # type: ignore[misc]
        im = small.resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    im.save(out, fmt, **save)
    return out.getvalue()


# --- imageinfo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "save"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("JPEG", {"progressive": True}),
        ("WEBP", {"quality": 80}),  # lossy: VP8
        ("WEBP", {"lossless": True}),  # VP8L
        ("WEBP", {"quality": 80, "exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"}),  # VP8X
        ("GIF", {}),
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (1376, 768), (17, 3001)])
def test_dimensions_of_real_images(tmp_path: Path, fmt: str, save: dict[str, Any], size: tuple[int, int]) -> None:
    data = picture(*size, seed=1, fmt=fmt, **save)
    assert dimensions(data, MIMES[fmt]) == size
    assert dimensions(memoryview(data), "") == size  # the mime is a hint; the bytes decide
    assert dimensions(bytearray(data), "image/png") == size
    (tmp_path / "x").write_bytes(data)
    assert dimensions_of_file(tmp_path / "x") == size
    assert is_whole_image(MIMES[fmt], data)
    assert not is_whole_image(MIMES[fmt], data[:-7])
    if fmt == "WEBP" and "exif" in save:
        assert data[12:16] == b"VP8X"
    elif fmt == "WEBP":
        assert data[12:16] == (b"VP8L" if save.get("lossless") else b"VP8 ")


@pytest.mark.skipif(render_image is None, reason="runner.mockimages moved")
@pytest.mark.parametrize("mime", ["png", "jpeg", "webp"])
def test_dimensions_of_mock_images_padded(mime: str) -> None:
    data = render_image(344, 192, b"seed", mime, pad_bytes=3 << 20)  # JPEG: 49 COM segments of 64 KB
    assert len(data) > 3 << 20
    assert dimensions(data, f"image/{mime}") == (344, 192)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (344, 192)


def test_jpeg_walks_huge_padding_reading_little() -> None:
    """300 COM segments of 64 KB before the frame header: one small read per segment, not 20 MB."""
    base = picture(640, 480, seed=2, fmt="JPEG")
    pad = (b"\xff\xfe" + struct.pack(">H", 65535) + bytes(65533)) * 300
    app = b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\x00\x00" + bytes(12)
    data = base[:2] + app + b"\xff\xff" + pad + base[2:]  # a fill byte before a marker too
    read_bytes = []

    def read(offset: int, count: int) -> bytes:
        read_bytes.append(count)
        return data[offset : offset + count]

    assert dimensions_of_stream(read) == (640, 480)
    assert sum(read_bytes) < 4096 and len(read_bytes) < 400


def test_garbage_truncated_and_hostile_headers_give_none() -> None:
    assert dimensions(b"", "image/png") is None
    assert dimensions(b"GIF89", "image/gif") is None
    assert dimensions(b"NOT-AN-IMAGE:" * 100, "image/png") is None
    assert dimensions(b"\xff\xd8\xff\xd9", "image/jpeg") is None  # EOI before any frame
    assert dimensions(b"\xff\xd8\xff\xda\x00\x08" + bytes(8), "image/jpeg") is None  # scan before a frame
    assert dimensions(b"\xff\xd8\xff\xe0\x00\x01", "image/jpeg") is None  # a length below 2
    assert dimensions(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + bytes(8), "image/png") is None  # 0x0
    huge = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\xff\xff\xff\xff\x00\x00\x00\x01"
    assert dimensions(huge, "image/png") is None
    formats: list[tuple[str, dict[str, Any]]] = [
        ("PNG", {}),
        ("JPEG", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
    ]
    for fmt, save in formats:
        data = picture(40, 30, seed=3, fmt=fmt, **save)
        header_end = next(n for n in range(len(data) + 1) if dimensions(data[:n]) is not None)
        for n in range(header_end):  # every cut before the size is known: None, never an exception
            assert dimensions(data[:n]) is None
        rng = random.Random(fmt)
        for _ in range(300):  # flipped bytes anywhere in the header: any answer, but no exception
            broken = bytearray(data[:200])
            broken[rng.randrange(len(broken))] = rng.randrange(256)
            found = dimensions(bytes(broken))
            assert found is None or (found[0] > 0 and found[1] > 0)
    assert dimensions_of_file("/nonexistent/image.png") is None


# --- a realistic output dir --------------------------------------------------------------------


def item_id(n: int) -> str:
    return hashlib.sha256(f"item{n}".encode()).hexdigest()[:20]


class OutDir:
    """An output dir written by hand: images on disk and manifest lines as the writer makes them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []

    def _file(self, rel: str, data: bytes) -> dict[str, Any]:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)
        return {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "mtime_ns": (self.root / rel).stat().st_mtime_ns,
        }

    def stored_input(self, data: bytes, path: str) -> dict[str, Any]:
        sha = hashlib.sha256(data).hexdigest()
        rel = f"inputs/{sha[:2]}/{sha}.png"
        self._file(rel, data)
        return {"path": path, "sha256": sha, "mime": "image/png", "bytes": len(data), "stored": rel}

    def add(
        self,
        n: int,
        data: bytes | None = None,
        *,
        mime: str = "image/png",
        ratio: str = "1:1",
        size: str | None = None,
        model: str = "nanobanana_pro",
        vars_: dict[str, str] | None = None,
        inputs: list[dict[str, Any]] | None = None,
        params: dict[str, Any] | None = None,
        extra: list[bytes] | None = None,
        record_size: bool = True,
        error: str | None = None,
        prompt: str | None = None,
        minute: int = 0,
    ) -> dict[str, Any]:
        iid = item_id(n)
        images: list[Any] = []
        if not error:
            assert data is not None
            ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}[mime]
            files = [(f"images/{iid[:2]}/{iid}.{ext}", mime, data)]
            files += [(f"images/{iid[:2]}/{iid}-{j}.png", "image/png", more) for j, more in enumerate(extra or [], 1)]
            for k, (rel, kind, blob) in enumerate(files):
                w, h = dimensions(blob) or (None, None)
                known = record_size or k > 0
                images.append({"image_path": rel, "mime": kind, **self._file(rel, blob),
                               "width": w if known else None, "height": h if known else None})  # fmt: skip
        rec = manifest_line(
            None, iid, error={"kind": error, "status": None, "message": "refused"} if error else None,
            prompt=prompt or f"prompt number {n}", prompt_id=f"p{n % 3}", model=model, config=(ratio, size),
            vars_=vars_, repeat=n % 2, latency=10.0 + n, at=f"2026-11-25T08:{minute:02d}:00.000+00:00",
            images=images or None, inputs=inputs, params=params,
            usage={"prompt_tokens": 9, "completion_tokens": 1120, "total_tokens": 1129},
        )  # fmt: skip
        self.records.append(rec)
        return rec

    def write(self) -> None:
        with (self.root / "manifest.jsonl").open("w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")


def build_quality_dir(root: Path) -> tuple[OutDir, dict[str, str]]:
    """Items named by letter: repeats, near copies, wrong shapes, a blank image, a missing file."""
    out = OutDir(root)
    a = picture(128, 128, seed=10)
    names = {}

    def add(name: str, n: int, data: bytes | None, **kw: Any) -> None:
        out.add(n, data, **kw)
        names[name] = item_id(n)

    add("A", 1, a)
    add("B", 2, a)  # the same bytes again: a duplicate
    add("C", 3, picture(128, 128, seed=10, fmt="JPEG", quality=92), mime="image/jpeg")  # A re-encoded: near
    add("D", 4, picture(128, 128, seed=11), extra=[picture(128, 128, seed=12)])
    add("E", 5, picture(128, 128, seed=12))  # = D's second image
    add("F", 6, picture(128, 128, seed=13), ratio="16:9")  # square for 16:9
    add("G", 7, picture(150, 112, seed=14), ratio="4:3", record_size=False)  # 4:3 read from the header
    add("H", 8, picture(150, 100, seed=15), ratio="4:3", record_size=False)  # 3:2 for 4:3, from the header
    add("I", 9, picture(128, 128, seed=0, solid=(250, 250, 250)))  # blank
    add("J", 10, picture(128, 128, seed=16))
    add("K", 11, picture(128, 128, seed=17))  # its file is deleted below
    add("L", 12, None, error="content_filter")
    add("M", 13, picture(1024, 1024, seed=18))  # the real 1K size
    add("N", 14, picture(688, 384, seed=19), ratio="16:9", model="nanobanana_2", size="512")  # 1.79 for 1.78: within 2%
    out.write()
    (root / out.records[10]["image_path"]).unlink()
    return out, names


def test_analyze_exact_lists(tmp_path: Path) -> None:
    out, n = build_quality_dir(tmp_path / "out")
    cache = tmp_path / "out" / ".quality-cache.tsv"
    result = analyze(out.records, LocalSource(out.root), cache_path=cache)  # type: ignore[arg-type]
    assert result["duplicates"] == [[n["A"], n["B"]], [n["D"], n["E"]]]
    assert result["near_duplicates"] == [[n["A"], n["B"], n["C"]]]
    assert "dHash" in result["near_duplicates_note"] and result["near_threshold"] == 4
    assert result["size_mismatches"] == [n["F"], n["H"]]
    assert result["uniform"] == [n["I"]]
    assert result["unreadable"] == [n["K"]]  # missing: it could not be hashed
    ok = [n[x] for x in "ABCDEFGHIJK"]
    assert result["size_off"] == ok  # 128 px against 1024: the mock's 1/8 scale; M and N are the real size
    assert result["pixel_sizes"] == [
        {"model": "nanobanana_2", "aspect_ratio": "16:9", "image_size": "512", "sizes": {"688x384": 1}},
        {"model": "nanobanana_pro", "aspect_ratio": "16:9", "image_size": "1K", "sizes": {"128x128": 1}},
        {"model": "nanobanana_pro", "aspect_ratio": "1:1", "image_size": "1K", "sizes": {"128x128": 9, "1024x1024": 1}},
        {"model": "nanobanana_pro", "aspect_ratio": "4:3", "image_size": "1K", "sizes": {"150x112": 1, "150x100": 1}},
    ]
    assert result["hashes"] == {"images": 12, "hashed": 11, "from_cache": 0, "unreadable": 1}
    json.dumps(result)

    # Again: every hash from the cache, the same answer.
    again = analyze(out.records, LocalSource(out.root), cache_path=cache)  # type: ignore[arg-type]
    assert again["hashes"] == {"images": 12, "hashed": 0, "from_cache": 11, "unreadable": 1}
    assert {k: v for k, v in again.items() if k != "hashes"} == {k: v for k, v in result.items() if k != "hashes"}

    # A torn cache line and a changed image: only those are hashed again.
    with cache.open("a") as f:
        f.write("deadbeef\t12")
    j = next(r for r in out.records if r["item_id"] == n["J"])
    new = picture(128, 128, seed=10, fmt="PNG", optimize=True)  # A's picture, other bytes: near A now
    (out.root / j["image_path"]).write_bytes(new)
    j.update(bytes=len(new), sha256=hashlib.sha256(new).hexdigest())
    third = analyze(out.records, LocalSource(out.root), cache_path=cache)  # type: ignore[arg-type]
    assert third["hashes"] == {"images": 12, "hashed": 1, "from_cache": 10, "unreadable": 1}
    assert third["near_duplicates"] == [[n["A"], n["B"], n["C"], n["J"]]]
    assert cache.read_text().startswith(CACHE_HEADER)


def test_analyze_resolves_latest_and_threshold(tmp_path: Path) -> None:
    out, n = build_quality_dir(tmp_path / "out")
    # B retried later with another image: no longer a duplicate of A
    later = dict(out.records[1])
    data = picture(128, 128, seed=99)
    (out.root / later["image_path"]).write_bytes(data)
    later.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    failed_after = {**out.records[0], "status": "failed", "error": {"kind": "timeout", "status": None, "message": "t"}}
    records = [*out.records, later, failed_after]  # a failure never replaces an ok
    result = analyze(records, LocalSource(out.root), near_threshold=0)  # type: ignore[arg-type]
    assert result["duplicates"] == [[n["D"], n["E"]]]
    assert result["near_duplicates"] == []  # A and its JPEG copy C differ by a bit or two: not at threshold 0
    assert analyze(records, LocalSource(out.root), near_threshold=2)["near_duplicates"] == [[n["A"], n["C"]]]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0\.\.32"):
        analyze(records, LocalSource(out.root), near_threshold=40)  # type: ignore[arg-type]


def test_without_pillow_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, n = build_quality_dir(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL fails as if it were not installed
    result = analyze(out.records, LocalSource(out.root))  # type: ignore[arg-type]
    assert result["near_duplicates"] is None and result["uniform"] is None and result["hashes"] is None
    assert "not checked" in result["near_duplicates_note"] and "pip install" in result["near_duplicates_note"]
    assert result["duplicates"] == [[n["A"], n["B"]], [n["D"], n["E"]]]  # no decoder needed
    assert result["size_mismatches"] == [n["F"], n["H"]]
    assert result["unreadable"] == []  # nothing had to be read but the headers of G and H
    from runner.report.text import format_quality

    said = format_quality(result)  # type: ignore[arg-type]
    assert "near duplicates, single-colour images: not checked" in said, said  # both need Pillow: both said


def test_duplicate_groups_merge_and_order() -> None:
    def rec(i: str, *shas: str) -> Any:
        images: list[Any] = [
            {"image_path": f"images/{i}-{k}.png", "mime": "image/png", "bytes": 1, "sha256": s, "mtime_ns": None,
             "width": None, "height": None}
            for k, s in enumerate(shas)
        ]  # fmt: skip
        return manifest_line(None, i, images=images)

    # c links a's and b's groups; d repeats its own image (one item: no group)
    records = [rec("e", "x"), rec("a", "s1"), rec("b", "s2"), rec("c", "s1", "s2"), rec("d", "s3", "s3"), rec("f", "x")]
    assert duplicate_groups(records) == [["e", "f"], ["a", "b", "c"]]


@pytest.mark.parametrize("threshold", [0, 1, 3, 4, 6, 10])
def test_near_pairs_equal_all_pairs(threshold: int) -> None:
    rng = random.Random(threshold)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for base in list(hashes[:60]):  # planted neighbours at every distance up to threshold + 2
        flipped = base
        for bit in rng.sample(range(64), rng.randrange(threshold + 3)):
            flipped ^= 1 << bit
        hashes.append(flipped)
    hashes = list(dict.fromkeys(hashes))
    brute = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if (hashes[i] ^ hashes[j]).bit_count() <= threshold
    }
    found = set(near_pairs(hashes, threshold))
    assert found == brute
    assert len(brute) >= (10 if threshold else 0)  # the planted pairs are there to be found


def test_worker_processes_hash_like_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the window, misses go to worker processes in batches: the same hashes, every one cached."""
    from runner.quality import phash

    out, _ = build_quality_dir(tmp_path / "out")
    wanted = [(r["sha256"], r["image_path"]) for r in out.records if r["status"] == "ok"]
    wanted = list(dict(wanted).items())
    here = dict(phash.hash_images(wanted, LocalSource(out.root), phash.HashCache(None), workers=1))
    monkeypatch.setattr(phash, "_WINDOW", 3)
    monkeypatch.setattr(phash, "_BATCH", 2)
    cache = phash.HashCache(tmp_path / "cache.tsv")
    there = dict(phash.hash_images(wanted, LocalSource(out.root), cache, workers=2))
    assert there == here and len(here) == len(wanted) == 12
    assert sum(v is None for v in there.values()) == 1  # K's file is gone
    cache.save()
    assert len(phash.HashCache(tmp_path / "cache.tsv").known) == 11


def test_every_documented_and_mock_size_has_its_ratio() -> None:
    """No false alarm: the real pixel size of every model, ratio and size, and the mock's default
    1/8 scale of it, are within the 2% the check allows."""
    from runner.models import MODELS, pixel_size
    from runner.quality import shape_checks

    def rec(i: int, model: str, ratio: str, size: str | None, wh: tuple[int, int]) -> Any:
        image: Any = {"image_path": f"images/{i}.png", "mime": "image/png", "bytes": 1, "sha256": "", "mtime_ns": None,
                      "width": wh[0], "height": wh[1]}  # fmt: skip
        return manifest_line(None, f"{i:x}", model=model, config=(ratio, size), images=[image])

    records: list[Any] = []
    for model, info in MODELS.items():
        for ratio in info.aspect_ratios:
            for size in info.sizes or (None,):
                w, h = pixel_size(model, ratio, size)
                records += [
                    rec(len(records), model, ratio, size, (w, h)),
                    rec(len(records) + 1, model, ratio, size, (w // 8, h // 8)),
                ]
    result = shape_checks(records, LocalSource(Path("/nonexistent")))
    assert result["size_mismatches"] == [] and result["unreadable"] == []
    assert result["size_off"] == [r["item_id"] for r in records[1::2]]  # the mock's 1/8 size is far off, on purpose
    assert len(records) == 2 * (10 + 10 * 3 + 14 * 4)


def test_a_cache_that_cannot_be_written_costs_nothing_but_time(tmp_path: Path) -> None:
    out, n = build_quality_dir(tmp_path / "out")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = analyze(out.records, LocalSource(out.root), cache_path=blocked / "cache.tsv")  # type: ignore[arg-type]
    assert result["near_duplicates"] == [[n["A"], n["B"], n["C"]]]
    assert result["hashes"]["hashed"] == 11 and "cache_error" in result["hashes"]
