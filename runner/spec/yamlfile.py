"""Load a YAML job spec defensively: duplicate keys refused, alias bombs and unusable text caught."""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from ..errors import SpecError

# A job spec is small; past this many values (counting every alias expansion) it is a bomb
# (`a: &a [x, x]`, `b: &b [*a, *a]`, ... nine levels of ten is a billion values from 600 bytes).
MAX_VALUES = 1_000_000
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class explains it
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} is given twice (first on line {first.start_mark.line + 1}); YAML would keep only the last",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep)  # type: ignore[arg-type]


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML text into plain Python values, or raise a SpecError naming the file and line."""
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(file, "", f"not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise SpecError(file, "", "not valid YAML: nested too deeply") from None
    scan(raw, file)
    return raw


def scan(raw: Any, file: str) -> None:
    """Walk every value once, counting alias expansions: refuse bombs, lone surrogates and
    non-finite numbers before any other check touches the tree."""
    count = 0
    stack: list[tuple[Any, tuple[str, ...]]] = [(raw, ())]
    while stack:
        value, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SpecError(
                file,
                "",
                f"the spec expands to more than {MAX_VALUES:,} values (YAML anchors and aliases repeated "
                "inside each other?); write big lists in prompt_files instead",
            )
        if isinstance(value, dict):
            for k, v in value.items():
                name = str(k)
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise SpecError(file, _path(path), f"key {k!r} holds a lone UTF-16 surrogate: not text")
                stack.append((v, (*path, name)))
        elif isinstance(value, list):
            stack.extend((v, (*path, f"[{i}]")) for i, v in enumerate(value))
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                raise SpecError(
                    file, _path(path), "holds a lone UTF-16 surrogate (an escape like \\ud800): not text; fix the value"
                )
        elif isinstance(value, float) and not math.isfinite(value):
            raise SpecError(file, _path(path), f"expected a finite number, got {value}")


def _path(parts: tuple[str, ...]) -> str:
    out = ""
    for p in parts:
        out += p if p.startswith("[") or not out else f".{p}"
    return out
