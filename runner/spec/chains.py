"""Edit chains: `@ID` in a prompt's `images` feeds it the images another prompt of the spec made.

    - {id: base, template: "a studio photo of a {product} on white", vars: {product: [mug, lamp]}}
    - {id: edit, template: "put the {product} in a {room}", images: ["@base"], vars: {room: [kitchen, loft]}}

The chained prompt runs once per ok image of its parent prompt, times its own combinations; a
label both carry (`product` above) joins them: a `product: mug` edit pairs only with `product:
mug` parents. Labels merge, the parent's first; a chained template may use its ancestors'
labels as placeholders. Chains may be several steps long. The checks here run on the raw YAML,
before the prompts are parsed, so that an unknown `@ID` or a cycle is one clear error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError

CHAIN_REF = re.compile(r"@([^\s@{}]+)")


@dataclass(frozen=True)
class Link:
    """A chained prompt's tie to its parent prompt."""

    parent: str  # the parent prompt's id
    slot: int  # where the parent's image goes in this prompt's `images`
    inherited: frozenset[str]  # label names its ancestors carry (placeholders it may use, vars that join)

    def __repr__(self) -> str:  # sorted: the spec's fingerprint hashes it, and a set's order changes per process
        return f"Link(parent={self.parent!r}, slot={self.slot!r}, inherited={sorted(self.inherited)!r})"


def chain_ref(ref: str) -> str | None:
    """The parent prompt id of an `@ID` image reference, else None."""
    m = CHAIN_REF.fullmatch(ref.strip()) if isinstance(ref, str) else None
    return m.group(1) if m else None


def prescan(file: str, raw_prompts: Sequence[Any]) -> dict[int, Link]:
    """prompts[i] -> its Link, for every chained prompt; SpecError for an unknown `@ID`, a prompt
    chained to itself or in a cycle, or more than one `@ID` in a prompt."""
    ids: dict[str, int] = {}
    for i, raw in enumerate(raw_prompts):
        if isinstance(raw, Mapping) and raw.get("id") not in (None, ""):
            ids.setdefault(str(raw["id"]).strip(), i)
    parents: dict[int, tuple[str, int]] = {}
    for i, raw in enumerate(raw_prompts):
        images = raw.get("images") if isinstance(raw, Mapping) else None
        if not isinstance(images, list):
            continue
        refs = [(slot, chain_ref(ref)) for slot, ref in enumerate(images) if isinstance(ref, str)]
        found = [(slot, parent) for slot, parent in refs if parent is not None]
        if len(found) > 1:
            raise SpecError(
                file, f"prompts[{i}].images", "one @ID a prompt: a chained prompt edits one parent's images"
            )
        if not found:
            continue
        slot, parent = found[0]
        if parent not in ids:
            known = ", ".join(sorted(ids)) or "none: give the parent prompt an `id`"
            raise SpecError(
                file, f"prompts[{i}].images[{slot}]", f"@{parent} names no prompt of this spec (prompt ids: {known})"
            )
        parents[i] = (parent, slot)
    links: dict[int, Link] = {}
    for i in parents:
        seen, at, names = [i], i, set()
        while at in parents:
            parent_index = ids[parents[at][0]]
            if parent_index in seen:
                cycle = " -> ".join(
                    f"@{_id_of(raw_prompts[k])}" for k in [*seen, parent_index][seen.index(parent_index) :]
                )
                raise SpecError(file, f"prompts[{i}].images", f"the chain goes round in a cycle: {cycle}")
            seen.append(parent_index)
            names |= _labels(raw_prompts[parent_index])
            at = parent_index
        links[i] = Link(parents[i][0], parents[i][1], frozenset(names))
    return links


def _id_of(raw: Any) -> str:
    return str(raw.get("id", "?")) if isinstance(raw, Mapping) else "?"


def _labels(raw: Any) -> set[str]:
    """The label names a raw prompt gives its items: its `vars` keys (template variables or plain labels)."""
    vars_ = raw.get("vars") if isinstance(raw, Mapping) else None
    return {str(k) for k in vars_} if isinstance(vars_, Mapping) else set()


def joins(own: Mapping[str, str], parent: Mapping[str, str] | None) -> bool:
    """Do a chained item's own labels agree with its parent's on every name both carry?"""
    return not parent or all(parent[k] == v for k, v in own.items() if k in parent)


def merged(parent: Mapping[str, str] | None, own: Mapping[str, str] | None) -> dict[str, str] | None:
    """The labels of a chained item: the parent's, then its own."""
    out = {**(parent or {}), **(own or {})}
    return out or None
