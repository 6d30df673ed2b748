"""Write tar shards in WebDataset form: per item `KEY.<ext>` (the image) + `KEY.json`, one sample at a time.

    DEST/shard-000000.tar, shard-000001.tar, ...   KEY is the item_id
      KEY.png             the image (its own extension: png, jpg, webp)
      KEY.json            item_id, prompt_id, prompt, model, image_config, repeat, width, height,
                          mime, sha256, bytes, vars, params, inputs, extra_images, usage, cost_usd,
                          latency_s, finished_at, run_id, request_id
      KEY.input0.png      the local reference images, by their position in `inputs`
      KEY.extra1.png      further images of the same answer

Loads with the `webdataset` library and with `datasets.load_dataset("webdataset",
data_files="DEST/shard-*.tar")`. That loader takes its columns from the first 5 samples: the
JSON has one shape in every sample (see schema.py) and the first samples are chosen so that
every key that holds a value somewhere holds one there. It also needs every sample to have the
same files: when items differ (another image type, another number of reference images) the
export says so in its warnings.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import IO, Any, BinaryIO

from ..output.files import atomic_file
from ..output.source import ImageSource
from ..record import Record, images_of
from ..report.summary import Summary
from .common import ExportResult, Filters, extension, local_inputs, require_records, select
from .schema import Shape, leading, present

INFERENCE_SAMPLES = 5  # datasets' WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE
DEFAULT_SHARD_SIZE = 1000
DEFAULT_SHARD_BYTES = 1 << 30  # WebDataset's advice: shards of a few hundred MB to a few GB


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def fields_of(rec: Record) -> tuple[str, ...]:
    """The files of a sample, by their field names (what follows `KEY.`)."""
    images = images_of(rec)
    names = [extension(images[0]["mime"], images[0]["image_path"]), "json"]
    names += [f"input{i}.{extension(x.get('mime', ''), x['stored'])}" for i, x in local_inputs(rec)]
    names += [f"extra{j}.{extension(x['mime'], x['image_path'])}" for j, x in enumerate(images[1:], 1)]
    return tuple(names)


def document(rec: Record, var_names: list[str]) -> dict[str, Any]:
    """The JSON of a sample before it is brought to the common shape."""
    config = rec.get("image_config") or {}
    labels = rec.get("vars") or {}
    fields = fields_of(rec)
    files = {i: name for (i, _), name in zip(local_inputs(rec), fields[2:], strict=False)}
    inputs = []
    for i, x in enumerate(rec.get("inputs") or []):
        entry = {k: x.get(k) for k in ("path", "url", "sha256", "mime", "bytes")}
        entry["file"] = files.get(i)
        inputs.append(entry)
    extras = [
        {
            "file": f"extra{j}.{extension(x['mime'], x['image_path'])}",
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
    `max_shard_bytes`; shards of an earlier, larger export in DEST are removed."""
    from .card import write_card

    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    result = ExportResult("webdataset", dest)
    chosen = select(require_records(records), source, filters or Filters(), result)
    shape, order = _plan(chosen.records, chosen.var_names, min(INFERENCE_SAMPLES, shard_size), result)
    with _Shards(dest, shard_size, max_shard_bytes) as shards:
        for rec in (chosen.records[i] for i in order):
            doc = shape.conform(document(rec, chosen.var_names))
            if _write_sample(shards, source, rec, doc, result):
                result.written += 1
    result.files += [shard_name(i) for i in range(shards.count)]
    if not result.written:
        result.warnings.append("no sample to write: no shard was made")
    if card:
        features = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
        signature = Counter(fields_of(rec) for rec in chosen.records).most_common(1)
        for name in signature[0][0] if signature else ("png", "json"):
            features.append(shape.feature("json") if name == "json" else {"name": name, "dtype": "image"})
        result.files.append(write_card(dest, result, chosen, summary, features, "shard-*.tar"))
    return result


def _plan(records: list[Record], var_names: list[str], lead: int, result: ExportResult) -> tuple[Shape, list[int]]:
    """The common JSON shape, and the order to write in: a few covering samples first, then the rest."""
    shape = Shape()
    for rec in records:
        shape.observe(document(rec, var_names))
    signatures = Counter(fields_of(rec) for rec in records)
    if len(signatures) > 1:
        (common, n), *_ = signatures.most_common(1)
        result.warnings.append(
            f"samples do not all have the same files ({len(signatures)} kinds; {n} of {len(records)} have "
            f"{', '.join(common)}): datasets' webdataset loader needs the same files in every sample and "
            "leaves out or empties the others; the webdataset library reads them all"
        )
    common_fields = signatures.most_common(1)[0][0] if signatures else ()
    covers: dict[frozenset[tuple[str, ...]], int] = {}
    counts: Counter[tuple[str, ...]] = Counter()
    for index, rec in enumerate(records):
        places = present(shape.conform(document(rec, var_names)))
        counts.update(places)
        if fields_of(rec) == common_fields:
            covers.setdefault(frozenset(places), index)
    needed = {p for p, c in counts.items() if c < len(records)}
    reduced: dict[frozenset[tuple[str, ...]], int] = {}
    for held, first in covers.items():
        reduced.setdefault(held & needed, first)
    picks = leading(reduced, needed, lead)
    uncovered = needed - set().union(*(held for held, first in covers.items() if first in picks))
    if uncovered and records:
        shown = ", ".join(".".join(p) for p in sorted(uncovered)[:5])
        result.warnings.append(
            f'no {lead} samples hold a value for every JSON key ({shown}); `datasets.load_dataset("webdataset")` '
            "may fail on them: load DEST itself (`load_dataset(DEST)`), whose README gives the types"
        )
    chosen = set(picks)
    return shape, picks + [i for i in range(len(records)) if i not in chosen]


def _mtime(rec: Record) -> int:
    try:
        return max(0, int(datetime.fromisoformat(rec["finished_at"].replace("Z", "+00:00")).timestamp()))
    except (KeyError, ValueError, AttributeError):
        return 0


def _write_sample(shards: _Shards, source: ImageSource, rec: Record, doc: Any, result: ExportResult) -> bool:
    """Open every file of the sample first (one missing skips the item, as in imagefolder: a
    sample must be whole), then stream them into the current shard."""
    key = rec["item_id"]
    fields = fields_of(rec)
    rels = [image["image_path"] for image in images_of(rec)]
    wanted = [(fields[0], rels[0])]
    wanted += [(name, x["stored"]) for name, (_, x) in zip(fields[2:], local_inputs(rec), strict=False)]
    wanted += [(name, rel) for name, rel in zip(fields[2 + len(local_inputs(rec)) :], rels[1:], strict=True)]
    with contextlib.ExitStack() as stack:
        opened: list[tuple[str, IO[bytes], int]] = []
        for name, rel in wanted:
            try:
                f = stack.enter_context(source.open(rel))
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
            except OSError:
                result.skip("missing_image" if name == fields[0] else "missing_file", key)
                return False
            opened.append((name, f, size))
        body = json.dumps(doc, ensure_ascii=False, sort_keys=False).encode("utf-8")
        members = [(opened[0][0], opened[0][1], opened[0][2]), ("json", BytesIO(body), len(body)), *opened[1:]]
        shards.add(key, members, _mtime(rec))
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

    def _finish(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()
        self._file.__exit__(None, None, None)  # fsynced and renamed into place
        self._tar, self._file = None, None
        self._samples = self._bytes = 0
