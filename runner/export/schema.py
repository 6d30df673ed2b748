"""One schema for the JSON of every WebDataset sample, so that columnar loaders read them all alike.

`datasets.load_dataset("webdataset")` infers its column types from the first 5 samples and
casts every later one to them: a key first seen in sample 6 is dropped, 0.5 after five 1s
becomes 0, a value where the first five had null fails the load. So every sample's JSON is
written in one shape (every key present, one type per key: int widened to float, mixed kinds
written as JSON text) and the first samples are chosen to hold a value wherever any sample does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Path_ = tuple[str, ...]
_ITEM = "[]"


@dataclass
class Shape:
    """The kinds a value took at one place in the documents (null, bool, int, float, str, dict, list)."""

    kinds: set[str] = field(default_factory=set)
    fields: dict[str, Shape] = field(default_factory=dict)
    item: Shape | None = None

    def observe(self, value: Any) -> None:
        kind = _kind(value)
        self.kinds.add(kind)
        if kind == "dict":
            for key, sub in value.items():
                self.fields.setdefault(str(key), Shape()).observe(sub)
        elif kind == "list":
            for sub in value:
                if self.item is None:
                    self.item = Shape()
                self.item.observe(sub)

    def resolved(self) -> str:
        """The one kind written here: null, bool, int, float, str, dict, list, or json (text)."""
        kinds = self.kinds - {"null"}
        if not kinds:
            return "null"
        if len(kinds) == 1:
            return next(iter(kinds))
        if kinds & {"dict", "list"} or "str" in kinds:
            return "json" if kinds & {"dict", "list"} else "str"
        return "float" if "float" in kinds else "int"  # bool with int: int

    def empty(self) -> bool:
        """Never anything in it (a dict without keys, a list without items): left out of the documents."""
        kind = self.resolved()
        return (kind == "dict" and not self.fields) or (kind == "list" and (self.item is None or self.item.empty()))

    def conform(self, value: Any) -> Any:
        kind = self.resolved()
        if value is None or kind == "null":
            return None
        if kind == "json":
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
        if kind == "dict":
            given = value if isinstance(value, dict) else {}
            return {k: s.conform(given.get(k)) for k, s in self.fields.items() if not s.empty()}
        if kind == "list":
            assert self.item is not None
            return [self.item.conform(v) for v in value] if isinstance(value, list) else None
        if kind == "float":
            return float(value) if isinstance(value, (int, float)) else None
        if kind == "int":
            return int(value) if isinstance(value, (int, float)) else None
        if kind == "str":
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return value  # bool

    def feature(self, name: str) -> dict[str, Any]:
        """This place as a `datasets` feature in the dataset card's YAML form."""
        return {"name": name, **self._type()}

    def _type(self) -> dict[str, Any]:
        kind = self.resolved()
        if kind == "dict":
            return {"struct": [s.feature(k) for k, s in self.fields.items() if not s.empty()]}
        if kind == "list":
            assert self.item is not None
            inner = self.item._type()
            return {"list": inner.get("dtype", inner.get("struct", inner))}
        return {"dtype": {"str": "string", "json": "string", "int": "int64", "float": "float64"}.get(kind, kind)}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "list"
    return "str"


def present(value: Any, at: Path_ = ()) -> set[Path_]:
    """The places in a conformed document that hold something (a non-empty list, a non-null value)."""
    found: set[Path_] = set()
    if value is None or value == []:
        return found
    found.add(at)
    if isinstance(value, dict):
        for key, sub in value.items():
            found |= present(sub, (*at, key))
    elif isinstance(value, list):
        for sub in value:
            found |= present(sub, (*at, _ITEM))
    return found


def leading(covers: dict[frozenset[Path_], int], needed: set[Path_], limit: int) -> list[int]:
    """Up to `limit` sample indices whose places together cover as much of `needed` as they can
    (greedy: each pick covers the most places still uncovered). `covers`: places -> first sample."""
    picks: list[int] = []
    left = set(needed)
    while left and len(picks) < limit:
        best = max(covers, key=lambda places: len(places & left), default=None)
        if best is None or not best & left:
            break
        picks.append(covers[best])
        left -= best
    return sorted(picks)
