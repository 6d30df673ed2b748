"""Remote manifests and ledgers as part objects: their names, which ones a reader reads, and merging.

An object store cannot append, so a run writes its manifest lines (and its batch events) as part
objects, a few seconds' lines each:

    <base>.part-<run>-<seq>.jsonl         base: manifest[.shard-K-of-N] or batches[.shard-K-of-N];
                                          run: <UTC stamp>-<random id>; seq: 000001, 000002, ...

and when it ends (or, if it was killed, the next run of its shard, at start) one merged object

    <base>.part-<run>.upto-<seq>.jsonl    the run's parts up to <seq>, concatenated in order

written before those parts are deleted. A reader takes, per run, the merged object with the highest
`upto` and the parts above it (`select`): at every moment of a merge, and after a kill anywhere in
one, each line is read exactly once. Both names sort where the run's parts did, so a run's lines stay
in time order with other runs' (record.supersedes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_NAME = re.compile(
    r"(?P<run>(?P<base>(?:manifest|batches)(?:\.shard-\d+-of-\d+)?)\.part-[0-9A-Za-z]+-[0-9a-f]+)"
    r"(?:-(?P<seq>\d+)|\.upto-(?P<upto>\d+))\.jsonl"
)


def part_name(run: str, seq: int) -> str:
    return f"{run}-{seq:06d}.jsonl"


def merged_name(run: str, upto: int) -> str:
    return f"{run}.upto-{upto:06d}.jsonl"


@dataclass
class RunParts:
    """The objects one run left under one base name."""

    run: str  # the name prefix: <base>.part-<run>
    base: str
    parts: dict[int, str] = field(default_factory=dict)  # seq -> name
    merged: dict[int, str] = field(default_factory=dict)  # upto -> name

    @property
    def upto(self) -> int:
        return max(self.merged, default=0)

    @property
    def last(self) -> int:
        """The highest part number this run's objects cover."""
        return max(self.upto, max(self.parts, default=0))

    def readable(self) -> list[str]:
        """What a reader reads, in order: the newest merged object, then the parts it does not hold."""
        names = [self.merged[self.upto]] if self.merged else []
        return names + [self.parts[s] for s in sorted(self.parts) if s > self.upto]

    def covered(self) -> list[str]:
        """Objects whose lines a newer merged object holds (left by a merge that was cut short)."""
        older = [name for upto, name in self.merged.items() if upto < self.upto]
        return older + [name for seq, name in self.parts.items() if seq <= self.upto]

    def needs_merge(self) -> bool:
        return len(self.readable()) > 1 or bool(self.covered())


def group(names: Iterable[str]) -> tuple[dict[str, RunParts], list[str]]:
    """Part objects by run, and the other names (a plain manifest.jsonl, say)."""
    runs: dict[str, RunParts] = {}
    other: list[str] = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m is None:
            other.append(name)
            continue
        entry = runs.setdefault(m["run"], RunParts(m["run"], m["base"]))
        if m["seq"] is not None:
            entry.parts[int(m["seq"])] = name
        else:
            entry.merged[int(m["upto"])] = name
    return runs, other


def select(names: Iterable[str]) -> list[str]:
    """The names a reader reads (each line once), sorted."""
    runs, other = group(names)
    return sorted(other + [name for entry in runs.values() for name in entry.readable()])
