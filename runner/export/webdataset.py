"""Write tar shards in WebDataset form: per item `KEY.<ext>` (the image) + `KEY.json`, one sample at a time.

    DEST/shard-000000.tar, shard-000001.tar, ...   KEY is the item_id
      KEY.png             the image
      KEY.json            item_id, prompt_id, prompt, model, image_config, repeat, width, height,
                          mime, sha256, bytes, image_file, vars, params, inputs, extra_images, usage,
                          cost_usd, latency_s, finished_at, run_id, request_id
      KEY.input0.png      the local reference images, by their position in `inputs`
      KEY.extra1.png      further images of the same answer

Every sample has the same member names for the same roles (image, input0, input1, ..., extra1,
...): `datasets.load_dataset("webdataset")` refuses samples whose files differ ("don't share the
same prefix or the same types") and types each column by its extension. A role whose files are
all of one type keeps them as they are; one that mixes types (JPEG, PNG and WebP product photos)
is written as PNG, converted losslessly with Pillow (the decoded pixels, EXIF and ICC profile
kept), or, without Pillow, as the original bytes under `<role>.bin` with their type in the JSON
(`file_mime`). Samples with fewer reference images than others (or no extra image) are written
after the ones with more, in shards of their own: the loader reads its columns from the first
samples and leaves a member a sample lacks empty (None).

Loads with the `webdataset` library and with `datasets.load_dataset("webdataset",
data_files="DEST/shard-*.tar")`. That loader takes its columns from the first 5 samples: the
JSON has one shape in every sample (see schema.py) and the first samples are chosen so that
every key that holds a value somewhere holds one there.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import IO, Any, BinaryIO

from ..output.files import atomic_file
from ..output.source import ImageSource
from ..record import Record, images_of
from ..report.shapes import Summary
from .common import ExportResult, Filters, Staging, extension, local_inputs, require_records, select
from .schema import Shape, leading, present

INFERENCE_SAMPLES = 5  # datasets' WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE
DEFAULT_SHARD_SIZE = 1000
DEFAULT_SHARD_BYTES = 1 << 30  # WebDataset's advice: shards of a few hundred MB to a few GB


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


Part = tuple[str, str, str, str]  # (role, path in the output dir, mime, sha256) of one file of a sample
DECODABLE = {"png", "jpg", "webp", "gif"}  # what Pillow reads without plugins (not heic, heif)


def parts_of(rec: Record) -> list[Part]:
    """The files of a sample by role: `image`, `input<i>` (the position in `inputs`), `extra<j>`."""
    images = images_of(rec)
    first = images[0]
    parts = [("image", first["image_path"], first["mime"], first["sha256"])]
    parts += [(f"input{i}", x["stored"], x.get("mime", ""), x.get("sha256", "")) for i, x in local_inputs(rec)]
    parts += [(f"extra{j}", x["image_path"], x["mime"], x["sha256"]) for j, x in enumerate(images[1:], 1)]
    return parts


class Members:
    """One member name per role for every sample of the export: the role's one file type, or, where
    samples mix types, PNG (converted losslessly with Pillow) or `bin` (the original bytes)."""

    def __init__(self, records: Iterable[Record], tmp: Path) -> None:
        kinds: dict[str, set[str]] = {}
        for rec in records:
            for role, rel, mime, _ in parts_of(rec):
                kinds.setdefault(role, set()).add(extension(mime, rel))
        self.pillow = _pillow()
        self.ext: dict[str, str] = {}
        for role, exts in kinds.items():
            if len(exts) == 1:
                self.ext[role] = next(iter(exts))
            elif self.pillow and exts <= DECODABLE:
                self.ext[role] = "png"
            else:
                self.ext[role] = "bin"
        self.mixed = {role: sorted(exts) for role, exts in kinds.items() if len(exts) > 1}
        self._tmp = tmp
        self._converted: dict[str, Path] = {}  # sha256 -> its PNG (reference images repeat across items)

    def name(self, role: str) -> str:
        """The member name after `KEY.`: `png` for the image, `input0.png` for the first reference..."""
        return self.ext[role] if role == "image" else f"{role}.{self.ext[role]}"

    def mime(self, role: str, original: str) -> str:
        """The type of the member's bytes."""
        return "image/png" if self.converts(role, original) else original

    def converts(self, role: str, mime: str) -> bool:
        return self.ext[role] == "png" and role in self.mixed and mime.lower() != "image/png"

    def signature(self, rec: Record) -> tuple[str, ...]:
        return tuple(role for role, _, _, _ in parts_of(rec))

    def open(self, source: ImageSource, role: str, rel: str, mime: str, sha256: str) -> tuple[IO[bytes], int]:
        """The member's bytes as a file and their size: the file itself, or its PNG conversion."""
        if not self.converts(role, mime):
            f = source.open(rel)
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            return f, size
        path = self._converted.get(sha256) if sha256 else None
        if path is None:
            with source.open(rel) as f:
                data = _to_png(f)
            if role == "image" or role.startswith("extra") or not sha256:  # one item's own: kept in memory only
                return BytesIO(data), len(data)
            path = self._tmp / f"{len(self._converted)}.png"
            path.write_bytes(data)
            self._converted[sha256] = path
        return path.open("rb"), path.stat().st_size


def _pillow() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _to_png(f: IO[bytes]) -> bytes:
    """An image as PNG, pixel for pixel (PNG is lossless), its EXIF (orientation) and ICC profile kept.
    Raises OSError for bytes Pillow cannot decode."""
    from PIL import Image

    try:
        with Image.open(f) as opened:
            opened.load()
            exif, icc = opened.info.get("exif"), opened.info.get("icc_profile")
            im: Image.Image = opened
            if im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # CMYK, YCbCr: PNG has no such mode
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            out = BytesIO()
            options: dict[str, Any] = {"exif": exif} if exif else {}
            if icc:
                options["icc_profile"] = icc
            im.save(out, "PNG", **options)
    except (ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise OSError(f"cannot convert to PNG: {e}") from None
    return out.getvalue()


def document(rec: Record, var_names: list[str], members: Members) -> dict[str, Any]:
    """The JSON of a sample before it is brought to the common shape."""
    config = rec.get("image_config") or {}
    labels = rec.get("vars") or {}
    files = {int(role[5:]): role for role, _, _, _ in parts_of(rec) if role.startswith("input")}
    inputs = []
    for i, x in enumerate(rec.get("inputs") or []):
        entry = {
            k: x.get(k) for k in ("path", "url", "sha256", "mime", "bytes", "item_id")
        }  # item_id: an edit chain's source
        role = files.get(i)
        entry["file"] = members.name(role) if role else None
        entry["file_mime"] = members.mime(role, x.get("mime", "")) if role else None
        inputs.append(entry)
    extras = [
        {
            "file": members.name(f"extra{j}"),
            "file_mime": members.mime(f"extra{j}", x["mime"]),
            **{k: x.get(k) for k in ("mime", "sha256", "bytes", "width", "height")},
        }
        for j, x in enumerate(images_of(rec)[1:], 1)
    ]
    return {
        "item_id": rec["item_id"],
        "prompt_id": rec.get("prompt_id"),
        "prompt": rec.get("prompt"),
        "model": rec.get("model"),
        "image_config": {
            "aspect_ratio": config.get("aspect_ratio"),
            "image_size": config.get("image_size"),  # as sent: null when none was
        },
        "repeat": rec.get("repeat"),
        "width": rec.get("width"),
        "height": rec.get("height"),
        "mime": rec.get("mime"),
        "sha256": rec.get("sha256"),
        "bytes": rec.get("bytes"),
        "image_file": members.name("image"),
        "image_file_mime": members.mime("image", rec.get("mime", "")),
        "vars": {name: None if labels.get(name) is None else str(labels[name]) for name in var_names},
        "params": rec.get("params"),
        "inputs": inputs,
        "extra_images": extras,
        "usage": rec.get("usage"),
        "cost_usd": rec.get("cost_usd"),
        "latency_s": rec.get("latency_s"),
        "finished_at": rec.get("finished_at"),
        "run_id": rec.get("run_id"),
        "request_id": rec.get("request_id"),
    }


def export_webdataset(
    records: Iterable[Record],
    source: ImageSource,
    dest: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    filters: Filters | None = None,
    summary: Summary | None = None,
    card: bool = True,
) -> ExportResult:
    """Write DEST/shard-NNNNNN.tar (each through a temporary name) and, with `card`, DEST/README.md.

    A shard holds at most `shard_size` samples and, past its first sample, at most
    `max_shard_bytes`; shards of an earlier, larger export in DEST are removed. Nothing to export
    (a filter that matches nothing, no ok item) is a UsageError, and nothing is written."""
    from .card import write_card

    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    dest = Path(dest)
    result = ExportResult("webdataset", dest)
    chosen = select(require_records(records), source, filters or Filters(), result)  # raises before any write
    with Staging(dest) as staging, tempfile.TemporaryDirectory(prefix="runner-wds-") as tmp:
        members = Members(chosen.records, Path(tmp))
        shape, groups = _plan(chosen.records, chosen.var_names, members, min(INFERENCE_SAMPLES, shard_size), result)
        with _Shards(dest, shard_size, max_shard_bytes) as shards:
            for group in groups:
                shards.finish()  # samples with other members go to shards of their own
                for rec in (chosen.records[i] for i in group):
                    doc = shape.conform(document(rec, chosen.var_names, members))
                    if _write_sample(shards, source, rec, doc, members, result):
                        result.written += 1
            staging.require(result)  # every sample went missing: no shard, no card, nothing left
        result.files += [shard_name(i) for i in range(shards.count)]
        if card:
            features = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
            first = groups[0] if groups else []
            roles = members.signature(chosen.records[first[0]]) if first else ("image",)
            features.append({"name": members.name(roles[0]), **_member_type(members, roles[0])})
            features.append(shape.feature("json"))
            features += [{"name": members.name(r), **_member_type(members, r)} for r in roles[1:]]
            result.files.append(write_card(dest, result, chosen, summary, features, "shard-*.tar"))
    return result


def _member_type(members: Members, role: str) -> dict[str, str]:
    return {"dtype": "binary" if members.ext[role] == "bin" else "image"}


def _plan(
    records: list[Record], var_names: list[str], members: Members, lead: int, result: ExportResult
) -> tuple[Shape, list[list[int]]]:
    """The common JSON shape, and the order to write in: samples grouped by their members, the group
    with the most first (the loader takes its columns from the first samples), each group in shards
    of its own; in the first group a few samples that hold every JSON key first, then the rest."""
    shape = Shape()
    for rec in records:
        shape.observe(document(rec, var_names, members))
    by_signature: dict[tuple[str, ...], list[int]] = {}
    for index, rec in enumerate(records):
        by_signature.setdefault(members.signature(rec), []).append(index)
    order = sorted(by_signature, key=lambda sig: (-len(sig), -len(by_signature[sig])))
    groups = [by_signature[sig] for sig in order]
    for role, kinds in sorted(members.mixed.items()):
        how = "converted losslessly to PNG" if members.ext[role] == "png" else "kept as they are in `.bin` members"
        result.warnings.append(
            f"{role} files are of several types ({', '.join(kinds)}): {how}, so every sample has the same members"
            + (
                ""
                if members.ext[role] == "png"
                else " (HEIC/HEIF cannot be converted)"
                if members.pillow
                else " (install Pillow to get PNG images instead)"
            )
        )
    if len(order) > 1:
        first = set(order[0])
        beyond = sorted({role for sig in order[1:] for role in sig} - first)
        result.warnings.append(
            f"samples differ in their members ({len(order)} kinds: e.g. {len(groups[0])} with "
            f"{', '.join(members.name(r) for r in order[0])}); each kind is written in shards of its own, the "
            "one with the most members first, so `datasets` loads every sample (a member a sample lacks is None)"
            + (
                f"; but {', '.join(beyond)} appear only in later samples, which `datasets` leaves out "
                "(the webdataset library reads them)"
                if beyond
                else ""
            )
        )
    if not groups:
        return shape, []
    covers: dict[frozenset[tuple[str, ...]], int] = {}
    counts: Counter[tuple[str, ...]] = Counter()
    for index, rec in enumerate(records):
        places = present(shape.conform(document(rec, var_names, members)))
        counts.update(places)
        if members.signature(rec) == order[0]:  # the first samples come from the first group
            covers.setdefault(frozenset(places), index)
    needed = {p for p, c in counts.items() if c < len(records)}
    reduced: dict[frozenset[tuple[str, ...]], int] = {}
    for held, first_index in covers.items():
        reduced.setdefault(held & needed, first_index)
    picks = leading(reduced, needed, lead)
    uncovered = needed - set().union(*(held for held, first_index in covers.items() if first_index in picks))
    if uncovered:
        shown = ", ".join(".".join(p) for p in sorted(uncovered)[:5])
        result.warnings.append(
            f'no {lead} samples hold a value for every JSON key ({shown}); `datasets.load_dataset("webdataset")` '
            "may fail on them: load DEST itself (`load_dataset(DEST)`), whose README gives the types"
        )
    chosen = set(picks)
    groups[0] = picks + [i for i in groups[0] if i not in chosen]
    return shape, groups


def _mtime(rec: Record) -> int:
    try:
        return max(0, int(datetime.fromisoformat(rec["finished_at"].replace("Z", "+00:00")).timestamp()))
    except (KeyError, ValueError, AttributeError):
        return 0


def _write_sample(
    shards: _Shards, source: ImageSource, rec: Record, doc: Any, members: Members, result: ExportResult
) -> bool:
    """Open every file of the sample first (one missing skips the item, as in imagefolder: a
    sample must be whole), then stream them into the current shard."""
    key = rec["item_id"]
    with contextlib.ExitStack() as stack:
        opened: list[tuple[str, IO[bytes], int]] = []
        for role, rel, mime, sha256 in parts_of(rec):
            try:
                f, size = members.open(source, role, rel, mime, sha256)
                stack.enter_context(f)
            except FileNotFoundError:
                result.skip("missing_image" if role == "image" else "missing_file", key)
                return False
            except OSError:  # could not be converted to the role's PNG: not an image Pillow reads
                result.skip("unreadable_file", key)
                return False
            opened.append((members.name(role), f, size))
        body = json.dumps(doc, ensure_ascii=False, sort_keys=False).encode("utf-8")
        shards.add(key, [opened[0], ("json", BytesIO(body), len(body)), *opened[1:]], _mtime(rec))
    return True


class _Shards:
    """The shard being written; the next one starts past `size` samples or `max_bytes`."""

    def __init__(self, dest: Path, size: int, max_bytes: int | None) -> None:
        self.dest, self.size, self.max_bytes = dest, size, max_bytes
        self.count = 0  # shards begun
        self._tar: tarfile.TarFile | None = None
        self._file: contextlib.AbstractContextManager[BinaryIO] | None = None
        self._samples = self._bytes = 0

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish()
            for stale in self.dest.glob("shard-*.tar"):  # from an earlier, larger export
                if stale.name not in {shard_name(i) for i in range(self.count)}:
                    stale.unlink()
        elif self._tar is not None and self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: the archive's end cannot be written either
                self._tar.close()
            self._file.__exit__(*exc)  # type: ignore[arg-type]  # the temp file goes, the shard stays as it was

    def add(self, key: str, members: list[tuple[str, IO[bytes], int]], mtime: int) -> None:
        total = sum(512 + -(-size // 512) * 512 for _, _, size in members)
        if self._tar is not None and (
            self._samples >= self.size or (self.max_bytes is not None and self._bytes + total > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._file = atomic_file(self.dest / shard_name(self.count))
            out = self._file.__enter__()
            self._tar = tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _finish)
            self.count += 1
        for name, f, size in members:
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = size, mtime, 0o644
            self._tar.addfile(info, f)
        self._samples += 1
        self._bytes += total

    def finish(self) -> None:
        """Close the shard being written: the next sample starts a new one."""
        self._finish()

    def _finish(self) -> None:
        if self._tar is None or self._file is None:
            return
        tar, file = self._tar, self._file
        self._tar, self._file = None, None
        self._samples = self._bytes = 0
        try:
            tar.close()
        except BaseException as e:
            file.__exit__(type(e), e, e.__traceback__)  # the temp file goes
            raise
        file.__exit__(None, None, None)  # fsynced and renamed into place
