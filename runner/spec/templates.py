"""Prompt templates: `{placeholders}` filled from variable lists, as a product or zipped."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .sources import columns, file_kind, read_values

VAR_FILE_KEYS = {"file", "column"}
MAX_COMBINATIONS = 10_000_000  # a template without `sample` expands to at most this many prompts
# Up to this many combinations, `sample` ranks them all by a seeded hash (the order older runs
# used); past it, it draws seeded random indices without enumerating anything.
RANK_LIMIT = 1_000_000


@dataclass(frozen=True)
class Template:
    template: str
    names: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]  # one tuple of values per name
    combine: str  # product | zip
    sample: int | None
    seed: int
    digest: str  # hash of all of the above: stable across runs

    @property
    def full_count(self) -> int:
        if self.combine == "zip":
            return len(self.values[0]) if self.values else 1
        return math.prod(len(v) for v in self.values)

    def _combos(self) -> Iterator[tuple[str, ...]]:
        if self.combine == "zip":
            return zip(*self.values, strict=True)
        return itertools.product(*self.values)

    @property
    def longest(self) -> int:
        """The most UTF-8 bytes one of its prompts can take (for the request size check)."""
        size = len(self.template.encode())
        for name, values in zip(self.names, self.values, strict=True):
            size += self.template.count("{" + name + "}") * max(len(v.encode()) for v in values)
        return size

    @property
    def count(self) -> int:
        """How many prompts it yields: the sample size, or every combination."""
        return min(self.sample, self.full_count) if self.sample else self.full_count

    def expand(self, given: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
        """Yield (prompt text, vars) for every combination, or for the seeded sample. `given`: labels
        from a chained prompt's parent, which its placeholders may use (its own values win)."""
        combos: Iterator[tuple[str, ...]] = self._combos()
        if self.sample and self.sample < self.full_count:
            if self.full_count <= RANK_LIMIT:
                # Rank every combination by a seeded hash and keep the N lowest: the same seed
                # picks the same items, and a larger N keeps all the items a smaller one picked.
                picked = heapq.nsmallest(self.sample, enumerate(combos), key=lambda ic: self._rank(ic[1]))
                combos = (combo for _, combo in sorted(picked))
            else:
                combos = (self._combo(i) for i in self._draw())
        for combo in combos:
            vars_ = dict(zip(self.names, combo, strict=True))
            yield self.template.format(**({**given, **vars_} if given else vars_)), vars_

    def _draw(self) -> list[int]:
        """`sample` distinct combination numbers from a seeded stream: reproducible, and a
        larger sample keeps the smaller one's picks (it reads further down the same stream)."""
        rng = random.Random(f"runner-sample:{self.seed}")
        picked: dict[int, None] = {}
        while len(picked) < (self.sample or 0):
            picked.setdefault(rng.randrange(self.full_count))
        return sorted(picked)

    def _combo(self, number: int) -> tuple[str, ...]:
        """The combination at this position of the full product (or zip)."""
        if self.combine == "zip":
            return tuple(v[number] for v in self.values)
        out = []
        for values in reversed(self.values):
            number, i = divmod(number, len(values))
            out.append(values[i])
        return tuple(reversed(out))

    def _rank(self, combo: tuple[str, ...]) -> bytes:
        return hashlib.sha256(json.dumps([self.seed, combo], ensure_ascii=False).encode()).digest()


def placeholders(text: str) -> list[str]:
    """The {names} in a template string; ValueError for a malformed one."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(f"{e} (write a literal brace as {{{{ or }}}})") from None
    for f, spec, conv in parsed:
        # No format specs or conversions: {x:>300000000} would make a 300 MB prompt from a 4-byte value.
        if not f.isidentifier() or spec or conv:
            raise ValueError(
                f"placeholder {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} must be a plain name like {{subject}}"
            )
    return [f for f, _, _ in parsed]


def parse_template(
    file: str,
    key: str,
    m: dict[str, Any],
    base: Path,
    also_used: frozenset[str] = frozenset(),
    inherited: frozenset[str] = frozenset(),
) -> Template:
    """Check a template mapping; `also_used` are placeholders of its image paths, which may name vars
    too; `inherited` are label names a chained template gets from its parents (its placeholders may
    use them without vars of their own)."""

    def fail(k: str, problem: str) -> SpecError:
        return SpecError(file, f"{key}.{k}", problem)

    text = m.get("template")
    if not isinstance(text, str) or not text.strip():
        raise fail("template", "expected a non-empty string")
    try:
        fields = placeholders(text)
    except ValueError as e:
        raise fail("template", str(e)) from None
    raw_vars = m.get("vars")
    if not isinstance(raw_vars, dict) or not raw_vars:
        raise fail("vars", "a template needs a mapping of variables to lists of values")
    for f in fields:
        if f not in raw_vars and f not in inherited:
            raise fail(
                "template", f"placeholder {{{f}}} has no variable in vars (vars: {', '.join(map(str, raw_vars))})"
            )
    names, values = [], []
    for name, raw in raw_vars.items():
        if name not in fields and name not in also_used:
            raise fail(f"vars.{name}", f"variable {name!r} is not used in the template {text!r}")
        names.append(str(name))
        values.append(_values(file, f"{key}.vars.{name}", raw, base))
    combine = m.get("combine", "product")
    if combine not in ("product", "zip"):
        raise fail("combine", f"expected product or zip, got {combine!r}")
    if combine == "zip" and len({len(v) for v in values}) > 1:
        sizes = ", ".join(f"{n}={len(v)}" for n, v in zip(names, values, strict=True))
        raise fail("combine", f"zip needs lists of equal length ({sizes})")
    sample = m.get("sample")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise fail("sample", "expected a whole number of at least 1")
    if sample is not None and sample > MAX_COMBINATIONS:
        raise fail("sample", f"at most {MAX_COMBINATIONS:,}")
    seed = m.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("seed", "expected a whole number")
    digest = hashlib.sha256(json.dumps([text, names, values, combine, sample, seed]).encode()).hexdigest()
    tpl = Template(text, tuple(names), tuple(tuple(v) for v in values), combine, sample, seed, digest)
    if sample is None and tpl.full_count > MAX_COMBINATIONS:
        sizes = " x ".join(str(len(v)) for v in values)
        raise fail(
            "vars",
            f"the template makes {tpl.full_count:,} combinations ({sizes}), more than {MAX_COMBINATIONS:,}; "
            "add `sample: N` to draw N of them",
        )
    return tpl


def _values(file: str, key: str, raw: Any, base: Path) -> list[str]:
    if isinstance(raw, list):
        if not raw:
            raise SpecError(file, key, "the list of values is empty")
        out = []
        for i, v in enumerate(raw):
            if isinstance(v, (dict, list)) or v is None:
                raise SpecError(file, f"{key}[{i}]", "values must be strings or numbers")
            out.append(str(v))
        return out
    if not isinstance(raw, dict):
        raise SpecError(file, key, "expected a list of values or {file: PATH, column: NAME}")
    for k in raw:
        if k not in VAR_FILE_KEYS:
            raise SpecError(file, f"{key}.{k}", "unknown key (known: column, file)")
    if not isinstance(raw.get("file"), str):
        raise SpecError(file, f"{key}.file", "expected a path relative to the spec file")
    path = base / raw["file"]
    kind = file_kind(path, file, f"{key}.file")
    column = raw.get("column")
    cols = columns(path, kind)
    if cols is not None:
        if column is None and len(cols) == 1:
            column = next(iter(cols))
        if column not in cols:
            raise SpecError(file, f"{key}.column", f"{path}: no column {column!r} (columns: {', '.join(sorted(cols))})")
    try:
        values = read_values(path, kind, column)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(file, f"{key}.file", f"{path}: {e}") from None
    if not values:
        raise SpecError(file, f"{key}.file", f"{path}: no values")
    return values
