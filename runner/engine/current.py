"""Which items an output dir's spec asks for now: report, gallery and export keep these by default.

An output dir remembers the spec it last ran (spec.json: `spec_path`). A record whose item the
spec no longer yields (a changed reference image, a removed CSV row, an edited prompt) is an
older record: it stays in the manifest, but "the dataset" is what the spec asks for now.

    current = current_items(view.snapshot())
    kept = {iid: rec for iid, rec in latest.items() if current.wants(iid)}

`spec_item_ids` is THE definition of the items of a spec, as a set of integer ids built in one
streaming pass (one int per item); what extends the items (edit chains) extends it here.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunnerError
from ..output import ResumeState
from ..spec.items import iter_keyed
from ..spec.parse import JobSpec, load_spec


def spec_item_ids(spec: JobSpec, state: ResumeState | None = None) -> set[int]:
    """Every item id the spec yields, as integers (int(item_id, 16)), without building the items. An
    edit chain's children are known only from their parents' images: with `state` (scanned with its
    images), those of the done parents are in it too (plan.iter_known), as a run would plan them."""
    if spec.chained and state is not None:
        from .plan import iter_known

        return {key for key, _ in iter_known(spec, state, None)}
    return {key for key, _ in iter_keyed(spec)}


def ids_digest(keys: int) -> str:
    """The text form of a sum of item ids (mod 2**80): equal sets give equal digests, in any order."""
    return f"{keys % (1 << 80):020x}"


@dataclass(frozen=True)
class CurrentItems:
    """The item ids of the spec an output dir last ran, or None when they cannot be known (then
    every record counts, and `note` says why)."""

    ids: Set[int] | None
    spec_path: str | None = None
    note: str | None = None  # why every record counts

    @property
    def known(self) -> bool:
        return self.ids is not None

    def wants(self, item_id: str) -> bool:
        """Is this item one the spec asks for now (always, when that is unknown)?"""
        if self.ids is None:
            return True
        try:
            return int(item_id, 16) in self.ids
        except ValueError:  # a hand-written id: not one the spec makes
            return False


ALL = CurrentItems(None, note="every record (--all-records)")


def current_items(snapshot: dict[str, Any], scan: Callable[[], ResumeState] | None = None) -> CurrentItems:
    """The items of the spec named in an output dir's spec.json; every record when the dir names no
    spec, or it is gone or no longer checks (the note says which). `scan`: the dir's resume state
    with its images, read only for a spec with edit chains (their children's ids come from it)."""
    path = snapshot.get("spec_path")
    if not isinstance(path, str) or not path:
        return CurrentItems(None, note="the output dir names no spec (spec.json): every record counts")
    if not Path(path).is_file():
        return CurrentItems(
            None, path, f"the spec {path} is gone (or, a relative path, not found from here): every record counts"
        )
    try:
        spec = load_spec(path)
        ids = spec_item_ids(spec, scan() if spec.chained and scan is not None else None)
    except RunnerError as e:
        return CurrentItems(None, path, f"the spec no longer checks ({e}): every record counts")
    return CurrentItems(ids, path)
