"""Write metadata.jsonl so the dataset loads with `datasets.load_dataset("imagefolder", data_dir=DEST)`.

The Hugging Face `imagefolder` loader finds the images under DEST and joins each to its line of
metadata.jsonl by `file_name` (the path relative to DEST); a column named `<x>_file_name` (a
path) or `<x>_file_names` (a list of paths) is loaded as an image column `<x>` (a list of
images), and every other key becomes a plain column:

    import datasets
    ds = datasets.load_dataset("imagefolder", data_dir="out/rooftop-cats", split="train")
    ds[0]["image"], ds[0]["prompt"], ds[0]["subject"], ds[0]["input_images"]

One line per exported item. Columns: file_name, item_id, prompt_id, prompt, model, aspect_ratio,
image_size (as sent, null when none was: the manifest's value), repeat, width, height;
one column per template variable, present on every line (null where an item has none, since
Arrow needs one schema), its values as strings; `params` (the request parameters as a JSON
string) when any item has some; `input_images_file_names` (the stored copies of local reference
images) and `input_urls` (reference images given by URL) when any item has them;
`extra_images_file_names` when any answer held more than one image. A variable named like one
of these columns is written as `var_<name>`, and one ending in `file_name(s)` (which the loader
would take for an image path) as `var_<name>_value`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..output.files import atomic_file
from ..output.source import ImageSource, read_dimensions
from ..record import Record
from ..report.shapes import Summary
from .common import ExportResult, Filters, Staging, all_files, local_inputs, place, require_records, select

METADATA = "metadata.jsonl"
FIXED = (
    "file_name",
    "item_id",
    "prompt_id",
    "prompt",
    "model",
    "aspect_ratio",
    "image_size",
    "repeat",
    "width",
    "height",
)
# Names the loader gives or takes: a variable must not land on one of them.
RESERVED = (*FIXED, "image", "params", "input_images", "input_images_file_names", "input_urls", "extra_images",
            "source_item_id", "extra_images_file_names", "label")  # fmt: skip


def var_columns(names: Iterable[str]) -> dict[str, str]:
    """Template variable name -> its column name (renamed only when it would clash or look like a path column)."""
    columns: dict[str, str] = {}
    taken = set(RESERVED)
    for name in sorted(names):
        column = name
        if column in taken or column.endswith(("file_name", "file_names")):
            column = f"var_{name}"
            if column.endswith(("file_name", "file_names")):
                column += "_value"
        while column in taken:
            column = f"var_{column}"
        taken.add(column)
        columns[name] = column
    return columns


def export_imagefolder(
    records: Iterable[Record],
    source: ImageSource,
    dest: Path,
    *,
    filters: Filters | None = None,
    summary: Summary | None = None,
    card: bool = True,
    copy_files: bool = True,
) -> ExportResult:
    """Write DEST/metadata.jsonl (temp file + os.replace) and, with `card`, DEST/README.md.

    When DEST is not the output dir itself, the images and stored reference images are placed
    there too (hardlinked where possible; `copy_files=False` leaves them where they are, for a
    remote output dir exported in place). `summary` gives the run facts for the card (see card.py)."""
    from .card import write_card

    dest = Path(dest)
    result = ExportResult("imagefolder", dest)
    chosen = select(require_records(records), source, filters or Filters(), result)  # raises before any write
    columns = var_columns(chosen.var_names)
    extras = {
        "params": any(rec.get("params") for rec in chosen.records),
        "input_images": any(local_inputs(rec) for rec in chosen.records),
        "input_urls": any(x.get("url") for rec in chosen.records for x in rec.get("inputs") or []),
        "extra_images": any(rec.get("extra_images") for rec in chosen.records),
        "aspect_ratio": any((rec.get("image_config") or {}).get("aspect_ratio") for rec in chosen.records),
        "image_size": any((rec.get("image_config") or {}).get("image_size") for rec in chosen.records),
        "chain": any(_source_of(rec) for rec in chosen.records),
    }
    placed: set[str] = set()  # reference images already in dest (many items share one)
    with Staging(dest) as staging:
        with atomic_file(dest / METADATA) as f:
            for rec in chosen.records:
                if copy_files and not all(
                    _place_new(source, rel, dest, result, placed, staging) for rel in all_files(rec)
                ):
                    result.skip("missing_file", rec["item_id"])
                    continue
                line = json.dumps(row(rec, columns, extras, source), ensure_ascii=False) + "\n"
                f.write(line.encode("utf-8", "replace"))
                result.written += 1
            staging.require(result)  # inside: the old metadata.jsonl stays as it was
        result.files.append(METADATA)
        if card:
            features = features_of(columns, extras)
            result.files.append(write_card(dest, result, chosen, summary, features))
    return result


def _place_new(
    source: ImageSource, rel: str, dest: Path, result: ExportResult, placed: set[str], staging: Staging
) -> bool:
    """place(), noting a file this export made, so that a refused export takes it away again."""
    new = rel not in placed and not (dest / rel).exists()
    done = place(source, rel, dest, result, placed)
    if done and new:
        staging.placed.append(dest / rel)
    return done


def row(rec: Record, columns: dict[str, str], extras: dict[str, bool], source: ImageSource) -> dict[str, Any]:
    """One metadata line: the fixed columns, the variables, then the optional columns in use."""
    config = rec.get("image_config") or {}
    vars_ = rec.get("vars") or {}
    width, height = rec.get("width"), rec.get("height")
    if not isinstance(width, int) or not isinstance(height, int):
        width, height = read_dimensions(source, rec["image_path"]) or (None, None)
    line: dict[str, Any] = {
        "file_name": rec["image_path"].replace(os.sep, "/"),
        "item_id": rec["item_id"],
        "prompt_id": rec.get("prompt_id"),
        "prompt": rec.get("prompt"),
        "model": rec.get("model"),
        "aspect_ratio": config.get("aspect_ratio"),
        "image_size": config.get("image_size"),  # as sent, as the manifest has it: null when none was
        "repeat": rec.get("repeat"),
        "width": width,
        "height": height,
    }
    for name, column in columns.items():
        value = vars_.get(name)
        line[column] = None if value is None else str(value)
    if extras["params"]:
        line["params"] = json.dumps(rec["params"], sort_keys=True) if rec.get("params") else None
    if extras["input_images"]:
        line["input_images_file_names"] = [x["stored"] for _, x in local_inputs(rec)]
    if extras["input_urls"]:
        line["input_urls"] = [x["url"] for x in rec.get("inputs") or [] if x.get("url")]
    if extras["extra_images"]:
        line["extra_images_file_names"] = [x["image_path"] for x in rec.get("extra_images") or []]
    if extras.get("chain"):
        line["source_item_id"] = _source_of(rec)
    return line


def _source_of(rec: Record) -> str | None:
    """An edit chain: the item whose image this one was made from."""
    return next((str(x["item_id"]) for x in rec.get("inputs") or [] if isinstance(x.get("item_id"), str)), None)


def features_of(columns: dict[str, str], extras: dict[str, bool]) -> list[dict[str, Any]]:
    """The columns as `datasets` loads them, in the dataset card's YAML form."""
    features: list[dict[str, Any]] = [{"name": "image", "dtype": "image"}]
    features += [
        # aspect_ratio, image_size: null in every row when none was sent (`datasets` loads them as null)
        {"name": name, "dtype": "string" if extras.get(name, True) else "null"}
        for name in ("item_id", "prompt_id", "prompt", "model", "aspect_ratio", "image_size")
    ]
    features += [{"name": name, "dtype": "int64"} for name in ("repeat", "width", "height")]
    features += [{"name": column, "dtype": "string"} for column in columns.values()]
    if extras["params"]:
        features.append({"name": "params", "dtype": "string"})
    if extras["input_images"]:
        features.append({"name": "input_images", "list": "image"})
    if extras["input_urls"]:
        features.append({"name": "input_urls", "list": "string"})
    if extras["extra_images"]:
        features.append({"name": "extra_images", "list": "image"})
    if extras.get("chain"):
        features.append({"name": "source_item_id", "dtype": "string"})
    return features
