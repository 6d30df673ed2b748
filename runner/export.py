"""Write OUT/metadata.jsonl so the dataset loads with `datasets.load_dataset("imagefolder", data_dir=OUT)`.

The Hugging Face `imagefolder` loader finds the images under OUT and joins each to its line of
metadata.jsonl by `file_name` (the path relative to OUT); every other key becomes a column:

    import datasets
    ds = datasets.load_dataset("imagefolder", data_dir="out/rooftop-cats", split="train")
    ds[0]["image"], ds[0]["prompt"], ds[0]["subject"]

One line per item whose latest record is ok and whose image is on disk. Template variables get a
column each, present on every line (null where an item has no such variable) because Arrow needs
one schema; their values are written as strings. A variable named like a fixed column is
written as `var_<name>`. `image_size` is the size produced (the model's default when none was
sent), `file_name` the image_path of the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .output.manifest import latest
from .report import require_manifest, size_of

METADATA = "metadata.jsonl"
FIXED = ("file_name", "item_id", "prompt_id", "prompt", "model", "aspect_ratio", "image_size", "repeat")


def var_columns(names: set[str]) -> dict[str, str]:
    """Template variable name -> its column name (prefixed only when it would clash)."""
    columns: dict[str, str] = {}
    taken = set(FIXED)
    for name in sorted(names):
        column = name if name not in taken else f"var_{name}"
        while column in taken:
            column = f"var_{column}"
        taken.add(column)
        columns[name] = column
    return columns


def export(out: Path, image_sizes: dict[str, int] | None = None) -> Path:
    """Write OUT/metadata.jsonl (temp file + os.replace) and return its path.

    `image_sizes` (a remote dir's listing) says which images exist instead of the local disk."""
    require_manifest(out)

    def present(rel: str) -> bool:
        return rel in image_sizes if image_sizes is not None else (out / rel).is_file()

    records = [
        rec
        for rec in latest(out).values()
        if rec.get("status") == "ok" and isinstance(rec.get("image_path"), str) and present(rec["image_path"])
    ]
    names = {str(k) for rec in records if isinstance(rec.get("vars"), dict) for k in rec["vars"]}
    columns = var_columns(names)
    path = out / METADATA
    tmp = out / f".{METADATA}.{os.getpid()}.tmp"
    try:
        with tmp.open("w", encoding="utf-8", errors="replace", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(_row(rec, columns), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _row(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    config = rec.get("image_config") if isinstance(rec.get("image_config"), dict) else {}
    vars_ = {str(k): v for k, v in rec["vars"].items()} if isinstance(rec.get("vars"), dict) else {}
    row: dict[str, Any] = {
        "file_name": rec["image_path"].replace(os.sep, "/"),
        "item_id": rec.get("item_id"),
        "prompt_id": rec.get("prompt_id"),
        "prompt": rec.get("prompt"),
        "model": rec.get("model"),
        "aspect_ratio": config.get("aspect_ratio"),
        "image_size": None if size_of(rec) == "?" else size_of(rec),
        "repeat": rec.get("repeat"),
    }
    for name, column in columns.items():
        value = vars_.get(name)
        row[column] = None if value is None else str(value)
    return row
