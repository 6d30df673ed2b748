"""What both export formats share: the filters, choosing the records, the result, placing files in dest."""

from __future__ import annotations

import os
import shlex
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

    def describe(self) -> str:
        """The filter as the command line gives it (for the dataset card): `none` without one."""
        parts = [shlex.join(["--where", f"{name}={value}"]) for name, value in self.where]
        parts += ["--exclude-duplicates"] * self.exclude_duplicates + ["--exclude-mismatched"] * self.exclude_mismatched
        return " ".join(parts) or "none"

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
    older: int = 0  # items with records that the output dir's spec no longer asks for, left out
    records_note: str | None = None  # why every record's item was exported (no spec, spec gone, --all-records)

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
            "older_records_left_out": self.older,
            "records_note": self.records_note,
        }


@dataclass
class Selection:
    records: list[Record]  # to export, in manifest order
    var_names: list[str]  # every template variable of the exported items, sorted
    duplicates_removed: int
    models: Counter[tuple[str, str, str]]  # (model, aspect_ratio, image_size) -> items
    filters: Filters = field(default_factory=Filters)


def select(records: Iterable[Record], source: ImageSource, filters: Filters, result: ExportResult) -> Selection:
    """The latest ok record of each item that passes the filters and whose image is there.

    Order of the cuts: failed, `where`, missing or corrupt image, wrong shape, then duplicates, so that the
    copy a duplicate group keeps is one that is exported."""
    kept: list[Record] = []
    labels: set[str] = set()
    named = {name for name, _ in filters.where}
    values: dict[str, Counter[str]] = {name: Counter() for name in named}  # of the ok items, for a refusal
    items = ok = 0
    for rec in latest(records, source.intact).values():
        items += 1
        labels.update(str(k) for k in rec.get("vars") or {})
        if rec["status"] != "ok":
            result.skip("failed", rec["item_id"])
            continue
        ok += 1
        for name in named:
            value = (rec.get("vars") or {}).get(name)
            if value is not None:
                values[name][str(value)] += 1
        if not _matches(rec, filters.where):
            result.skip("where", rec["item_id"])
        elif not source.exists(rec.get("image_path", "")):
            result.skip("missing_image", rec["item_id"])
        elif not source.intact(rec):  # changed since it was recorded: a rerun makes it again
            result.skip("corrupt_image", rec["item_id"])
        else:
            kept.append(rec)
    unknown = sorted(named - labels)
    if unknown:  # a typo, not an empty selection: say so before anything is written
        known = ", ".join(sorted(labels)) or "none"
        raise UsageError(f"--where: no item has a label named {', '.join(unknown)} (labels: {known})")
    if not kept:
        raise UsageError(_nothing(filters, values, items, ok, result))
    if filters.exclude_mismatched:
        bad = set(shape_checks(kept, source)["size_mismatches"])
        for rec in kept:
            if rec["item_id"] in bad:
                result.skip("size_mismatch", rec["item_id"])
        kept = [rec for rec in kept if rec["item_id"] not in bad]
    if not kept:
        raise UsageError("nothing to export: every image is the wrong shape (--exclude-mismatched)")
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
        (rec.get("model", ""), (rec.get("image_config") or {}).get("aspect_ratio") or "", size_of(rec)) for rec in kept
    )
    return Selection(kept, names, removed, models, filters)


def _nothing(filters: Filters, values: dict[str, Counter[str]], items: int, ok: int, result: ExportResult) -> str:
    """Why an export would hold nothing, naming the label values that do exist."""
    if not items:
        return "nothing to export: the output dir has no records of the items its spec asks for (--all-records: every record)"
    if not ok:
        return f"nothing to export: none of the {items} items is ok (failed: {result.skipped.get('failed', 0)})"
    if filters.where:
        wanted = ", ".join(f"{name}={value}" for name, value in filters.where)
        have = "; ".join(
            f"{name} has "
            + ", ".join(f"{v!r} ({n})" for v, n in values[name].most_common(20))
            + (f", ... {len(values[name]) - 20} more" if len(values[name]) > 20 else "")
            for name in dict.fromkeys(name for name, _ in filters.where)
        )
        return (
            f"--where {wanted}: no ok item has {'that value' if len(filters.where) == 1 else 'all of those'} ({have})"
        )
    return f"nothing to export: the images of all {ok} ok items are missing"


@dataclass
class Staging:
    """A destination written only once there is something to write, and left as it was when the
    export is refused after all (every selected item's files gone): no empty folder, no stray file."""

    dest: Path
    made: Path | None = None  # the topmost folder this export created
    placed: list[Path] = field(default_factory=list)  # files made in a folder that was there before

    def __enter__(self) -> Staging:
        missing = None
        for folder in (self.dest, *self.dest.parents):
            if folder.exists():
                break
            missing = folder
        self.dest.mkdir(parents=True, exist_ok=True)
        self.made = missing
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            return
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)
        for path in self.placed:
            path.unlink(missing_ok=True)

    def require(self, result: ExportResult) -> None:
        """Refuse an export that wrote no item (UsageError: exit 2)."""
        if not result.written:
            why = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in result.skipped.items())
            raise UsageError(f"nothing exported: no selected item could be written ({why})")


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
