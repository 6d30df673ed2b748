"""Read prompt and value files (.txt, .jsonl, .csv) lazily, one record at a time."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from .errors import SpecError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}


def file_kind(path: Path, spec_file: str, key: str) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise SpecError(spec_file, key, f"{path.name}: unsupported file type (use .txt, .jsonl or .csv)")
    if not path.is_file():
        raise SpecError(spec_file, key, f"file not found: {path}")
    return kind


def iter_records(path: Path, kind: str) -> Iterator[tuple[int, dict[str, str] | str]]:
    """Yield (line number, record): a str for .txt lines, a dict of columns otherwise.

    Blank lines and, in .txt files, lines starting with '#' are skipped. Malformed
    records raise ValueError with the line number; callers turn it into a SpecError.
    """
    with path.open(encoding="utf-8", newline="") as f:
        if kind == "txt":
            for n, line in enumerate(f, 1):
                text = line.strip()
                if text and not text.startswith("#"):
                    yield n, text
        elif kind == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"line {n}: expected a JSON object")
                yield n, obj
        else:
            reader = csv.DictReader(f)
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                yield reader.line_num, row


def columns(path: Path, kind: str) -> set[str] | None:
    """The column names of a csv (header) or jsonl (first record) file; None for txt."""
    if kind == "txt":
        return None
    if kind == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            return set(next(csv.reader(f), []))
    for _, rec in iter_records(path, kind):
        assert isinstance(rec, dict)
        return set(rec)
    return set()


def iter_prompts(path: Path, kind: str) -> Iterator[tuple[str, str]]:
    """Yield (prompt_id, prompt text) from a prompt file; ids default to STEM-LINE."""
    stem = path.stem
    for n, rec in iter_records(path, kind):
        if isinstance(rec, str):
            yield f"{stem}-{n}", rec
            continue
        text = rec.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"line {n}: no 'prompt' value")
        pid = rec.get("id")
        yield (str(pid) if pid not in (None, "") else f"{stem}-{n}"), text.strip()


def read_values(path: Path, kind: str, column: str | None) -> list[str]:
    """All values of one column (or every line of a .txt file), for template variables."""
    values: list[str] = []
    for n, rec in iter_records(path, kind):
        if isinstance(rec, str):
            values.append(rec)
            continue
        if column is None or column not in rec:
            raise ValueError(f"line {n}: no column {column!r}")
        values.append(str(rec[column]))
    return values
