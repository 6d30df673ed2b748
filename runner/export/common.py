"""What both export formats share: the filters, choosing the records, the result, placing files in dest."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..output import EXTENSIONS as SAVED_EXTENSIONS
from ..output.files import atomic_file
from ..output.source import ImageSource
from ..quality import duplicate_groups, shape_checks
from ..record import InputRec, Record, images_of, latest, size_of

MAX_EXAMPLES = 3  # item_ids kept per skip reason
EXTENSIONS = {**SAVED_EXTENSIONS, "image/jpg": "jpg"}


@dataclass(frozen=True)
class Filters:
    """Which ok items an export keeps. `where`: (variable, value) pairs that must all hold."""

    exclude_duplicates: bool = False  # keep the first item of each byte-identical group
    exclude_mismatched: bool = False  # drop items whose image is not the requested aspect ratio
    where: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse_where(conditions: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """`var=value` strings -> pairs; a UsageError names the one without `=` or a name."""
        pairs = []
        for text in conditions:
            name, sep, value = text.partition("=")
            if not sep or not name.strip():
                raise UsageError(f"--where {text!r}: expected VAR=VALUE (a template variable and its value)")
            pairs.append((name.strip(), value))
        return tuple(pairs)


@dataclass
class ExportResult:
    """What an export wrote and what it left out, and why."""

    format: str
    dest: Path
    written: int = 0  # items (rows or samples)
    files: list[str] = field(default_factory=list)  # written in dest, relative to it
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> items
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few item_ids
    linked: int = 0  # image and reference files hardlinked into dest
    copied: int = 0  # ... or copied (another filesystem, or a remote source)
    warnings: list[str] = field(default_factory=list)
    location: str = ""  # where the dataset ended up: dest, or the remote URL it was uploaded to

    def skip(self, reason: str, item_id: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(item_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dest": self.location or str(self.dest),
            "written": self.written,
            "files": self.files,
            "skipped": self.skipped,
            "skipped_examples": self.examples,
            "linked": self.linked,
            "copied": self.copied,
            "warnings": self.warnings,
        }


@dataclass
class Selection:
    records: list[Record]  # to export, in manifest order
    var_names: list[str]  # every template variable of the exported items, sorted
    duplicates_removed: int
    models: Counter[tuple[str, str, str]]  # (model, aspect_ratio, image_size) -> items


def select(records: Iterable[Record], source: ImageSource, filters: Filters, result: ExportResult) -> Selection:
    """The latest ok record of each item that passes the filters and whose image is there.

    Order of the cuts: failed, `where`, missing image, wrong shape, then duplicates, so that the
    copy a duplicate group keeps is one that is exported."""
    kept: list[Record] = []
    labels: set[str] = set()
    for rec in latest(records, source.intact).values():
        labels.update(str(k) for k in rec.get("vars") or {})
        if rec["status"] != "ok":
            result.skip("failed", rec["item_id"])
        elif not _matches(rec, filters.where):
            result.skip("where", rec["item_id"])
        elif not source.exists(rec.get("image_path", "")):
            result.skip("missing_image", rec["item_id"])
        else:
            kept.append(rec)
    unknown = sorted({name for name, _ in filters.where} - labels)
    if unknown:  # a typo, not an empty selection: say so before anything is written
        known = ", ".join(sorted(labels)) or "none"
        raise UsageError(f"--where: no item has a label named {', '.join(unknown)} (labels: {known})")
    if filters.where and not kept:
        result.warnings.append("--where: no item has all of those values")
    if filters.exclude_mismatched:
        bad = set(shape_checks(kept, source)["size_mismatches"])
        for rec in kept:
            if rec["item_id"] in bad:
                result.skip("size_mismatch", rec["item_id"])
        kept = [rec for rec in kept if rec["item_id"] not in bad]
    removed = 0
    if filters.exclude_duplicates:
        copies = {item for group in duplicate_groups(kept) for item in group[1:]}
        for rec in kept:
            if rec["item_id"] in copies:
                result.skip("duplicate", rec["item_id"])
        removed = len(copies)
        kept = [rec for rec in kept if rec["item_id"] not in copies]
    names = sorted({str(k) for rec in kept for k in (rec.get("vars") or {})})
    models = Counter(
        (rec.get("model", ""), (rec.get("image_config") or {}).get("aspect_ratio", ""), size_of(rec)) for rec in kept
    )
    return Selection(kept, names, removed, models)


def _matches(rec: Record, where: tuple[tuple[str, str], ...]) -> bool:
    labels = rec.get("vars") or {}
    return all(name in labels and str(labels[name]) == value for name, value in where)


def extension(mime: str, path: str) -> str:
    """The file extension of an image: from its mime type, else from its path."""
    ext = EXTENSIONS.get(mime.lower())
    if ext:
        return ext
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return {"jpeg": "jpg"}.get(suffix, suffix) or "bin"


def local_inputs(rec: Record) -> list[tuple[int, InputRec]]:
    """(position, input) of the reference images that have a copy in the output dir."""
    return [(i, x) for i, x in enumerate(rec.get("inputs") or []) if isinstance(x.get("stored"), str) and x["stored"]]


def place(source: ImageSource, rel: str, dest: Path, result: ExportResult, done: set[str] | None = None) -> bool:
    """Make dest/rel the file rel of the source: nothing when it already is (dest is the output dir,
    or `rel` is in `done`: a reference image shared by many items), a hardlink where possible, else
    a copy (through a temporary name). False when the source lacks it."""
    if done is not None and rel in done:
        return True
    placed = _place(source, rel, dest, result)
    if placed and done is not None and rel.startswith("inputs/"):
        done.add(rel)
    return placed


def _place(source: ImageSource, rel: str, dest: Path, result: ExportResult) -> bool:
    target = dest / rel
    origin = source.local_path(rel)
    try:
        if origin is not None and target.exists() and os.path.samefile(origin, target):
            return True
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if origin is not None:
            try:
                os.link(origin, tmp)
                os.replace(tmp, target)
                result.linked += 1
                return True
            except OSError:
                tmp.unlink(missing_ok=True)
        try:
            with source.open(rel) as src, atomic_file(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except FileNotFoundError:
            return False
        result.copied += 1
        return True
    finally:
        tmp.unlink(missing_ok=True)


def all_files(rec: Record) -> list[str]:
    """Every file of an exported item in the output dir: its images, then its stored references."""
    return [image["image_path"] for image in images_of(rec)] + [x["stored"] for _, x in local_inputs(rec)]


def require_records(records: Collection[Record] | Iterable[Record]) -> Collection[Record]:
    """The records as a collection (exports read them more than once)."""
    return records if isinstance(records, Collection) else list(records)
