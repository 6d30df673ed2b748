"""Read prompt and value files (.txt, .jsonl, .csv) lazily, one record at a time, naming the line of any fault."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv"}
RESERVED = ("id", "prompt", "images")  # columns with a meaning; every other one is a label


@dataclass(frozen=True, slots=True)
class FilePrompt:
    prompt_id: str
    text: str
    images: tuple[str, ...]  # references as written (paths relative to the prompt file, or URLs)
    labels: dict[str, str] | None


def file_kind(path: Path, spec_file: str, key: str) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise SpecError(spec_file, key, f"{path.name}: unsupported file type (use .txt, .jsonl or .csv)")
    if not path.is_file():
        raise SpecError(spec_file, key, f"file not found: {path}")
    return kind


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded strictly: invalid UTF-8 names its line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"line {n}: not valid UTF-8 (byte {e.start + 1} of the line); save it as UTF-8"
                ) from None


def iter_records(path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield (line number, record): a str for .txt lines, a dict of columns otherwise.

    Blank lines and, in .txt files, lines starting with '#' are skipped. Malformed
    records raise ValueError with the line number; callers turn it into a SpecError.
    """
    if kind == "txt":
        for n, line in _lines(path):
            text = line.strip()
            if text and not text.startswith("#"):
                yield n, text.lstrip("\ufeff")
    elif kind == "jsonl":
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"line {n}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise ValueError(f"line {n}: expected a JSON object")
            yield n, obj
    else:
        numbered = _lines(path)
        current = [0]

        def text_lines() -> Iterator[str]:
            for n, line in numbered:
                current[0] = n
                yield line.lstrip("\ufeff") if n == 1 else line

        reader = csv.DictReader(text_lines(), strict=True)
        try:
            for row in reader:
                if None in row:
                    raise ValueError(f"line {current[0]}: more values than the header has columns")
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                yield current[0], row
        except csv.Error as e:
            raise ValueError(f"line {current[0]}: not valid CSV ({e})") from None


def columns(path: Path, kind: str) -> set[str] | None:
    """The column names of a csv (header) or jsonl (first record) file; None for txt."""
    if kind == "txt":
        return None
    if kind == "csv":
        for n, line in _lines(path):
            try:
                return set(next(csv.reader([line.lstrip("\ufeff")]), []))
            except csv.Error as e:
                raise ValueError(f"line {n}: not valid CSV ({e})") from None
        return set()
    for _, rec in iter_records(path, kind):
        assert isinstance(rec, dict)
        return set(rec)
    return set()


def iter_prompts(path: Path, kind: str) -> Iterator[FilePrompt]:
    """Every prompt of a prompt file; ids default to STEM-LINE, other columns become labels."""
    stem = path.stem
    for n, rec in iter_records(path, kind):
        if isinstance(rec, str):
            yield FilePrompt(f"{stem}-{n}", rec, (), None)
            continue
        text = rec.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"line {n}: no 'prompt' value")
        pid = rec.get("id")
        if pid is not None and not isinstance(pid, (str, int)):
            raise ValueError(f"line {n}: 'id' must be a string or a number")
        images = _images(rec.get("images"), n, kind)
        labels = {}
        for key, value in rec.items():
            if key in RESERVED:
                continue
            if isinstance(value, (dict, list)):
                raise ValueError(f"line {n}: column {key!r} must hold a plain value to be a label")
            labels[str(key)] = "" if value is None else _scalar(value)
        yield FilePrompt(str(pid) if pid not in (None, "") else f"{stem}-{n}", text.strip(), images, labels or None)


def _images(raw: Any, n: int, kind: str) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    if kind == "csv" and isinstance(raw, str):
        return tuple(p.strip() for p in raw.split("|") if p.strip())
    if isinstance(raw, list) and all(isinstance(p, str) and p.strip() for p in raw):
        return tuple(p.strip() for p in raw)
    raise ValueError(f"line {n}: 'images' must be a list of paths or URLs")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_values(path: Path, kind: str, column: str | None) -> list[str]:
    """All values of one column (or every line of a .txt file), for template variables."""
    values: list[str] = []
    for n, rec in iter_records(path, kind):
        if isinstance(rec, str):
            values.append(rec)
            continue
        if column is None or column not in rec:
            raise ValueError(f"line {n}: no column {column!r}")
        value = rec[column]
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"line {n}: column {column!r} must hold a plain value")
        values.append(_scalar(value))
    return values
