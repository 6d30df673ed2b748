"""Is the dataset any good: byte-identical and perceptually near images, wrong shapes, blank images.

    from runner.output.source import LocalSource
    from runner.quality import analyze
    result = analyze(records, LocalSource(out), cache_path=out / ".quality-cache.tsv")

`analyze` returns the keys `runner report --json` carries as they are (see `analyze`). Byte
duplicates and shapes need no decoder (sha256 and width/height are in the records, or a few
header bytes are read); near duplicates and single-colour images need Pillow (the `images`
extra) and say plainly when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypedDict

from ..models import MODELS, effective_size, nearest_ratio, pixel_size
from ..output.source import ImageSource, LocalSource, read_dimensions
from ..record import Record, images_of, latest
from .phash import MAX_THRESHOLD, HashCache, hash_images, near_pairs, pillow_missing

__all__ = [
    "ASPECT_TOLERANCE",
    "DEFAULT_NEAR_THRESHOLD",
    "MAX_THRESHOLD",
    "ImageSource",
    "LocalSource",
    "analyze",
    "duplicate_groups",
    "shape_checks",
]

DEFAULT_NEAR_THRESHOLD = 4  # bits of 64 (dHash): re-encodes, resizes and retouches; not a new picture
ASPECT_TOLERANCE = 0.02  # relative difference of width/height from the requested ratio
SIZE_OFF_RANGE = (0.5, 2.0)  # long side vs the model's documented size for the request
NEAR_NOTE_MISSING = (
    "not checked ({why}): pip install pillow (runner's optional `images` extra: pip install -e '.[images]' "
    "in its checkout), then run the report again"
)


def duplicate_groups(records: Iterable[Record]) -> list[list[str]]:
    """Groups (2+) of item_ids with byte-identical images (by recorded sha256, extra images too).

    Items in a group, and groups, follow the order of `records` (the first item of a group is
    the one an export keeps); groups that share an item are merged."""
    order: dict[str, int] = {}
    by_sha: dict[str, list[int]] = {}
    ids: list[str] = []
    for rec in records:
        for image in images_of(rec):
            if not image["sha256"]:
                continue
            index = order.get(rec["item_id"])
            if index is None:
                index = order[rec["item_id"]] = len(ids)
                ids.append(rec["item_id"])
            holders = by_sha.setdefault(image["sha256"], [])
            if not holders or holders[-1] != index:
                holders.append(index)
    return _groups(ids, (h for h in by_sha.values() if len(h) > 1))


def _groups(ids: list[str], linked: Iterable[list[int]]) -> list[list[str]]:
    """Connected components (2+ items) of the item indices linked together, in item order."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        root = i
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(i, i) != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for members in linked:
        for i in members:
            parent.setdefault(i, i)
        first = find(members[0])
        for other in members[1:]:
            root = find(other)
            if root != first:
                parent[max(root, first)] = min(root, first)
                first = min(root, first)
    components: dict[int, list[int]] = {}
    for i in parent:
        components.setdefault(find(i), []).append(i)
    groups = [sorted(set(m)) for m in components.values()]
    return [[ids[i] for i in g] for g in sorted(groups) if len(g) > 1]


def _ratio(text: str) -> float | None:
    try:
        w, h = (float(x) for x in text.split(":"))
    except (ValueError, AttributeError):
        return None
    return w / h if w > 0 and h > 0 else None


def shape_checks(records: Iterable[Record], source: ImageSource) -> dict[str, Any]:
    """size_mismatches, size_off, pixel_sizes and unreadable (see analyze), reading headers only
    for images whose record has no width/height."""
    mismatched: list[str] = []
    off: list[str] = []
    unreadable: list[str] = []
    seen: dict[tuple[str, str, str], dict[str, int]] = {}
    shapes: dict[str, tuple[int, int] | None] = {}  # a reference image's (width, height), read once
    for rec in records:
        images = images_of(rec)
        if not images:
            continue
        model = rec.get("model", "")
        config = rec.get("image_config") or {}
        aspect = str(config.get("aspect_ratio") or "")
        label = aspect
        if config.get("aspect_ratio", "") is None:  # none sent: the model keeps the input's shape
            aspect = expected_ratio(rec, source, shapes)
            label = f"{aspect or '?'} (input's shape)"
        sent = config.get("image_size")
        size = effective_size(model, sent) if model in MODELS else str(sent or "?")
        wanted = _ratio(aspect)
        try:
            expected = max(pixel_size(model, aspect, sent)) if model in MODELS else None
        except KeyError:  # a ratio the table does not know
            expected = None
        bad_shape = bad_size = broken = False
        for image in images:
            w, h = image.get("width"), image.get("height")
            if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
                found = read_dimensions(source, image["image_path"])
                if found is None:
                    broken = True
                    continue
                w, h = found
            counts = seen.setdefault((model, label, size), {})
            counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
            if wanted is not None and abs((w / h) / wanted - 1) > ASPECT_TOLERANCE:
                bad_shape = True
            if expected and not SIZE_OFF_RANGE[0] <= max(w, h) / expected <= SIZE_OFF_RANGE[1]:
                bad_size = True
        for flag, into in ((bad_shape, mismatched), (bad_size, off), (broken, unreadable)):
            if flag:
                into.append(rec["item_id"])
    pixel_sizes = [
        {"model": m, "aspect_ratio": a, "image_size": s, "sizes": dict(sorted(c.items(), key=lambda kv: -kv[1]))}
        for (m, a, s), c in sorted(seen.items())
    ]
    return {"size_mismatches": mismatched, "size_off": off, "pixel_sizes": pixel_sizes, "unreadable": unreadable}


def expected_ratio(rec: Record, source: ImageSource, shapes: dict[str, tuple[int, int] | None]) -> str:
    """The aspect ratio an item that sent none should have: the supported ratio nearest to its first
    reference image's shape ("1:1" without reference images, as Google makes squares then; "" when the
    first one is a URL or cannot be read: not checked)."""
    inputs = rec.get("inputs") or []
    if not inputs:
        return "1:1"
    stored = inputs[0].get("stored")
    if not stored or rec.get("model") not in MODELS:
        return ""
    if stored not in shapes:
        shapes[stored] = read_dimensions(source, stored)
    found = shapes[stored]
    return nearest_ratio(rec["model"], *found) if found else ""


def near_duplicates(
    records: list[Record], source: ImageSource, threshold: int, cache_path: Path | None
) -> dict[str, Any]:
    """near_duplicates, uniform and the hashing counts (Pillow present): one hash per distinct image."""
    ids = [rec["item_id"] for rec in records]
    holders: dict[str, list[int]] = {}  # sha256 -> item indices (in order, once each)
    path_of: dict[str, str] = {}
    for index, rec in enumerate(records):
        for image in images_of(rec):
            sha = image["sha256"]
            if sha:
                path_of.setdefault(sha, image["image_path"])
                held = holders.setdefault(sha, [])
                if not held or held[-1] != index:
                    held.append(index)
    cache = HashCache(cache_path)
    before = len(cache.known)
    shas: list[str] = []  # the distinct images that could be hashed
    by_value: dict[int, list[int]] = {}  # dhash -> indices into shas (equal hashes: distance 0)
    uniform: set[int] = set()
    failed: set[int] = set()  # items with an image that could not be hashed
    for sha, value in hash_images(path_of.items(), source, cache):
        if value is None:
            failed.update(holders[sha])
            continue
        by_value.setdefault(value.dhash, []).append(len(shas))
        shas.append(sha)
        if value.uniform:
            uniform.update(holders[sha])
    hashed, bad = len(cache.known) - before, len(path_of) - len(shas)
    counts: dict[str, Any] = {
        "images": len(path_of),
        "hashed": hashed,
        "from_cache": len(shas) - hashed,
        "unreadable": bad,
    }
    try:
        cache.save()
    except OSError as e:  # the cache only saves time: a read-only or full disk must not cost the report
        counts["cache_error"] = f"{type(e).__name__}: {e}"
    values = list(by_value)
    links = [members for members in by_value.values() if len(members) > 1]
    links += [by_value[values[a]][:1] + by_value[values[b]][:1] for a, b in near_pairs(values, threshold)]
    # Near images first (two or more different images), then the items that hold them: byte-identical
    # copies alone make no near group (they are `duplicates`).
    item_links = []
    for component in _groups(shas, (sorted(m) for m in links)):
        items = sorted({i for sha in component for i in holders[sha]})
        if len(items) > 1:
            item_links.append(items)
    dhash = {sha: value for value, members in by_value.items() for sha in (shas[i] for i in members)}

    def alike(a: str, b: str) -> bool:
        return a in dhash and b in dhash and (dhash[a] ^ dhash[b]).bit_count() <= threshold

    return {
        "near_duplicates": _groups(ids, item_links),
        "uniform": [ids[i] for i in sorted(uniform)],
        "unreadable": [ids[i] for i in sorted(failed)],
        "hashes": counts,
        "unchanged_edits": _unchanged(records, alike),
    }


def _unchanged(records: Iterable[Record], alike: Callable[[str, str], bool]) -> list[str]:
    """Edits (an edit chain's children) whose image is their source image again: byte-identical,
    or `alike` (perceptually near). An edit model that answers with its input is no edit."""
    found = []
    for rec in records:
        source = next((i.get("sha256") for i in rec.get("inputs", []) if i.get("item_id")), None)
        made = rec.get("sha256")
        if isinstance(source, str) and isinstance(made, str) and (source == made or alike(made, source)):
            found.append(rec["item_id"])
    return found


class Quality(TypedDict):
    """What analyze finds (the quality keys of `runner report --json`)."""

    duplicates: list[list[str]]
    near_duplicates: list[list[str]] | None
    near_duplicates_note: str
    near_threshold: int
    size_mismatches: list[str]
    size_off: list[str]
    pixel_sizes: list[dict[str, Any]]
    uniform: list[str] | None
    unreadable: list[str]
    hashes: dict[str, Any] | None
    unchanged_edits: list[str]  # edit chains: edits that gave their source image back (same bytes, or nearly)


def analyze(
    records: Iterable[Record],
    source: ImageSource,
    *,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    cache_path: Path | None = None,
    images: bool = True,
) -> Quality:
    """The quality of a run's images, over the latest record of each item (ok and failed given; the
    failed ones have no image and are passed over). Keys, all JSON-ready:

    - duplicates: [[item_id, ...], ...] byte-identical images (sha256), 2+ items a group
    - near_duplicates: the same for perceptually near but not identical images (64-bit dHash within
      `near_threshold` bits); None without Pillow
    - near_duplicates_note: how near duplicates were found, or plainly that they were not and how to enable it
    - near_threshold: the threshold used
    - size_mismatches: item_ids whose image is not the requested aspect ratio (beyond 2%)
    - size_off: item_ids whose long side is outside 0.5x-2x of the model's size for the request
    - pixel_sizes: [{model, aspect_ratio, image_size, sizes: {"WxH": count}}] per requested config
    - uniform: item_ids with a single-colour image; None without Pillow
    - unreadable: item_ids whose image could not be read when it had to be (missing, cut, not an image)
    - hashes: {images, hashed, from_cache, unreadable}: distinct images, hashed now, read from the
      cache, not hashable (and cache_error when the cache could not be written); None without Pillow

    `cache_path` keeps the perceptual hashes by sha256 (beside the manifest), so a second report
    decodes only new images. `images=False` skips decoding (near duplicates, uniform and hashes are
    then None). Raises ValueError for a threshold outside 0..MAX_THRESHOLD.
    """
    if not 0 <= near_threshold <= MAX_THRESHOLD:
        raise ValueError(f"near threshold must be 0..{MAX_THRESHOLD} bits, got {near_threshold}")
    ok = [rec for rec in latest(records, source.intact).values() if rec["status"] == "ok"]
    duplicates = duplicate_groups(ok)
    shapes = shape_checks(ok, source)
    missing = pillow_missing() if images else None
    if images and missing is None:
        near = near_duplicates(ok, source, near_threshold, cache_path)
        note = f"64-bit dHash of each distinct image, Hamming distance <= {near_threshold} bits"
    else:
        near = {"near_duplicates": None, "uniform": None, "hashes": None, "unreadable": [],
                "unchanged_edits": _unchanged(ok, lambda a, b: False)}  # fmt: skip
        note = NEAR_NOTE_MISSING.format(why=missing) if images else "not checked (--no-quality: no image was read)"
    unreadable = set(shapes["unreadable"]) | set(near["unreadable"])
    return Quality(
        duplicates=duplicates,
        near_duplicates=near["near_duplicates"],
        near_duplicates_note=note,
        near_threshold=near_threshold,
        size_mismatches=shapes["size_mismatches"],
        size_off=shapes["size_off"],
        pixel_sizes=shapes["pixel_sizes"],
        uniform=near["uniform"],
        unreadable=[rec["item_id"] for rec in ok if rec["item_id"] in unreadable],
        hashes=near["hashes"],
        unchanged_edits=near["unchanged_edits"],
    )
