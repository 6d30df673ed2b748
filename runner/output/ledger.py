"""The batch ledger: OUT/batches.jsonl, an append-only, fsynced log of what was submitted to Google's Batch API.

An interactive request dies with the process; a batch lives on the server for up to 48 hours.
So "submitted, not yet collected" is written down before anything can lose it, and a rerun
never submits an item of an open batch again. Events, one JSON object a line:

    prepare    {id, display_name, model, model_id, items: [item ids], reserved_usd, base_url, key_env, at, run_id}
               written (and fsynced) before the input file is uploaded or the batch created
    uploaded   {id, file}                 the input file's name on the Files API (deleted after collection)
    created    {id, name}                 the server's name, from create or found by display name after a crash
    state      {id, state, stats}         a change seen while polling (what `runner report` shows)
    collected  {id, state, ok, failed, returned}   its results are in the manifest (records committed first)
    abandoned  {id, why, state}           it never ran or ended without results: its items are to do again
    cleaned    {id}                       its input and results files are deleted from the Files API
    ref        {sha256, file, uri, at}    a reference image uploaded once for many requests
    ref_deleted {file}

The chat backends never write it. A damaged line (a kill mid-write) is ignored: its batch then
counts as never prepared only if the `prepare` itself was cut, and nothing was sent for it yet.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER = "batches.jsonl"
TERMINAL = ("collected", "abandoned")
_ITEM_ID = re.compile(r"[0-9a-f]{1,64}")
_BASE = re.compile(r"batches(?:\.shard-\d+-of-\d+)?")


def ledger_name(shard_label: str | None) -> str:
    return LEDGER if shard_label is None else f"batches.shard-{shard_label}.jsonl"


def ledger_base(name: str) -> str:
    """Which ledger a file holds events of: `batches` or `batches.shard-K-of-N` (its remote parts too)."""
    m = _BASE.match(name)
    return m.group(0) if m else name


@dataclass
class BatchEntry:
    """What the ledger says of one batch, folded from its events."""

    id: str
    display_name: str
    model: str
    model_id: str
    items: list[str]
    reserved_usd: float
    prepared_at: str
    base_url: str = ""
    key_env: str = ""
    file: str | None = None  # the uploaded input file
    uploaded_at: str = ""  # when (a create may have been sent since)
    name: str | None = None  # batches/... once created (or found)
    state: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    results_file: str | None = None
    ended: str | None = None  # collected | abandoned
    cleaned: bool = False
    outcome: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the ledger its prepare is in (ledger_base): the run of that shard collects it

    @property
    def open(self) -> bool:
        return self.ended is None


@dataclass
class Ledger:
    batches: dict[str, BatchEntry] = field(default_factory=dict)
    refs: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha256 -> {file, uri, at}
    damaged: int = 0
    # Events read before their batch's `prepare` (remote parts of two runs whose clocks disagree sort
    # out of order): applied when it comes, so a batch collected in one run never reopens.
    early: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def open_batches(self) -> list[BatchEntry]:
        return [b for b in self.batches.values() if b.open]

    def in_batch(self) -> set[int]:
        """Item ids (as integers) in batches still open: never submitted again."""
        return {int(i, 16) for b in self.batches.values() if b.open for i in b.items}

    def committed_usd(self) -> float:
        """What open batches may still cost: counted by the budget from submission on."""
        return sum(b.reserved_usd for b in self.batches.values() if b.open)

    def apply(self, event: dict[str, Any], source: str = "") -> None:
        kind = event.get("event")
        if kind == "ref":
            if not all(isinstance(event.get(k), str) for k in ("sha256", "file", "uri")):
                self.damaged += 1
                return
            self.refs[event["sha256"]] = event
            return
        if kind == "ref_deleted":
            self.refs = {k: v for k, v in self.refs.items() if v.get("file") != event.get("file")}
            return
        bid = event.get("id")
        if kind == "prepare":
            items = event.get("items")
            if not isinstance(bid, str) or not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                self.damaged += 1
                return
            ids = [i for i in items if _ITEM_ID.fullmatch(i)]  # a line changed by hand or by a bad disk: ids only
            reserved = event.get("reserved_usd")
            if not isinstance(reserved, int | float) or isinstance(reserved, bool) or not 0 <= reserved < math.inf:
                reserved = 0.0
                self.damaged += 1
            self.damaged += len(ids) < len(items)
            self.batches[bid] = BatchEntry(
                id=bid, display_name=str(event.get("display_name", "")), model=str(event.get("model", "")),
                model_id=str(event.get("model_id", "")), items=ids,
                reserved_usd=float(reserved), prepared_at=str(event.get("at", "")),
                base_url=str(event.get("base_url", "")), key_env=str(event.get("key_env", "")), source=source,
            )  # fmt: skip
            for later in self.early.pop(bid, []):
                self.apply(later)
            return
        if not isinstance(bid, str):
            self.damaged += 1
            return
        entry = self.batches.get(bid)
        if entry is None:
            self.early.setdefault(bid, []).append(event)
            return
        if any(k in event and not isinstance(event[k], str | None) for k in ("file", "name", "state", "results_file")):
            self.damaged += 1  # what names a file or a batch must be text: a damaged line says nothing
            return
        if kind == "uploaded":
            entry.file = event.get("file")
            entry.uploaded_at = str(event.get("at", ""))
        elif kind == "created":
            entry.name = event.get("name")
        elif kind == "state":
            entry.state = event.get("state")
            entry.stats = event["stats"] if isinstance(event.get("stats"), dict) else {}
            entry.results_file = event.get("results_file") or entry.results_file
        elif kind in TERMINAL:
            entry.ended = kind
            entry.state = event.get("state") or entry.state
            entry.results_file = event.get("results_file") or entry.results_file
            entry.outcome = {k: v for k, v in event.items() if k not in ("event", "id")}
        elif kind == "cleaned":
            entry.cleaned = True


def read_ledger(paths: Iterable[Path]) -> Ledger:
    """Every batch the ledgers of an output dir know (all shards), folded from their events."""
    ledger = Ledger()
    for path in paths:
        source = ledger_base(path.name)
        for event in _events(path):
            if event is None:
                ledger.damaged += 1
            else:
                ledger.apply(event, source)
    ledger.damaged += sum(len(events) for events in ledger.early.values())  # their `prepare` never came
    ledger.early.clear()
    return ledger


def _events(path: Path) -> Iterator[dict[str, Any] | None]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield None
                continue
            yield obj if isinstance(obj, dict) else None


def ledger_paths(out: Path) -> list[Path]:
    """The ledgers in an output dir (one per shard), and remote parts copied beside them."""
    try:
        return sorted(p for p in out.iterdir() if p.name.startswith("batches") and p.name.endswith(".jsonl"))
    except FileNotFoundError:
        return []


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, allow_nan=False).encode() + b"\n"
