"""What a run produced, summed up from its manifests: counts, failures, retries, cost, latency, throughput."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..output import View
from ..output.ledger import BatchEntry
from ..output.manifest import manifest_paths, read_records, shard_of
from ..pricing import money
from ..record import Record, size_of, supersedes
from .shapes import BatchesSummary, ChainsSummary, ModelLine, OpenBatch, ShardRow, Shards, StepSummary, Summary

MAX_EXAMPLES = 3  # distinct messages kept per failure kind
MAX_INPUTS_SHOWN = 50


def require_manifest(view: View) -> None:
    """Raise a UsageError unless `view` is an output dir with at least one manifest."""
    out = Path(view.display)
    if not view.remote and out.suffix in (".yaml", ".yml") and out.is_file():
        raise UsageError(f"{out} is a job spec; give its output dir (`runner estimate {out}` names it)")
    if not view.remote and not out.is_dir():
        raise UsageError(f"{out}: no such directory (expected a runner output directory)")
    if not view.has_manifests():
        raise UsageError(f"{view.display}: no manifest.jsonl here; is this the output_dir of a run?")


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it.

    Always one of the values (no interpolation); None for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None  # naive and aware stamps cannot be compared


@dataclass
class ShardAcc:
    cost: float = 0.0
    last: datetime | None = None


@dataclass
class Manifests:
    """One pass over every manifest line of an output dir: the record that counts per item
    (record.supersedes), and what every line adds (cost, attempts, retries: each line stands for
    requests made)."""

    view: View
    latest: dict[str, Record] = field(default_factory=dict)
    lines: int = 0
    damaged: int = 0
    cost: float = 0.0
    requests: int = 0
    retries_by_kind: Counter[str] = field(default_factory=Counter)
    cost_by_line: dict[tuple[str, str], float] = field(default_factory=dict)
    runs: dict[str, list[float]] = field(default_factory=dict)  # run_id -> [first start, last end] (epoch s)
    # run_id -> its start on the wall clock, from its first line that says when on the monotonic one
    anchors: dict[str, float] = field(default_factory=dict)
    stepped: set[str] = field(default_factory=set)  # runs whose wall times went backwards, with nothing better
    first: datetime | None = None
    last: datetime | None = None
    older: set[str] = field(default_factory=set)  # items whose lines were left out (not `wanted`)
    older_cost: float = 0.0
    shard_count: int | None = None  # the N whose shards the report shows
    by_shard: dict[int, ShardAcc] = field(default_factory=dict)
    paid_once: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # item -> its first paid ok line
    paid_again: set[str] = field(default_factory=set)  # items with another paid ok line
    # items whose record counts from a shard other than id % N: an edit chain's children go with their root's shard
    homes: dict[str, int] = field(default_factory=dict)


def _shard_count(view: View, paths: list[Path]) -> int | None:
    """The job's N: the one the dir last ran with (spec.json), else the largest its manifests name."""
    recorded = view.snapshot().get("shards")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    counts = [found[1] for p in paths if (found := shard_of(p)) is not None]
    return max(counts, default=None)


def _lines_by_shard(paths: list[Path], count: int | None, bad: list[int]) -> Iterator[tuple[int | None, Record]]:
    """Every valid line, with the K of the shard-K-of-`count` manifest it is in (None: another N's, or unsharded)."""
    for path in paths:
        found = shard_of(path)
        home = found[0] if count and found is not None and found[1] == count else None
        for rec in read_records(path, bad):
            yield home, rec


def read_manifests(view: View, wanted: Callable[[str], bool] | None = None) -> Manifests:
    """Every line of the output dir's manifests; with `wanted`, the lines of other items are only
    counted as older records (their items and cost), not summed up."""
    require_manifest(view)
    m = Manifests(view)
    bad: list[int] = []
    paths = manifest_paths(view.path)
    m.shard_count = count = _shard_count(view, paths)
    for home, rec in _lines_by_shard(paths, count, bad):
        m.lines += 1
        if wanted is not None and not wanted(rec["item_id"]):
            m.older.add(rec["item_id"])
            m.older_cost += float(rec.get("cost_usd") or 0.0)
            continue
        old = m.latest.get(rec["item_id"])
        if old is None or supersedes(rec["status"], old["status"], functools.partial(view.source.intact, old)):
            m.latest[rec["item_id"]] = rec
            if home is not None and home != int(rec["item_id"], 16) % (count or 1):
                m.homes[rec["item_id"]] = home
            else:
                m.homes.pop(rec["item_id"], None)
        spent = float(rec.get("cost_usd") or 0.0)
        m.cost += spent
        key = (str(rec.get("model")), size_of(rec))
        m.cost_by_line[key] = m.cost_by_line.get(key, 0.0) + spent
        attempts = max(0, rec.get("attempts", 0))
        m.requests += attempts
        retried = {str(k): v for k, v in rec.get("retried", {}).items() if isinstance(v, int) and v > 0}
        m.retries_by_kind.update(retried)
        unexplained = attempts - 1 - sum(retried.values())
        if unexplained > 0:  # lines of older versions say how many retries, not why
            m.retries_by_kind["unknown"] += unexplained
        if rec["status"] == "ok" and attempts:  # an image paid for here (a recovered line bought nothing)
            line_id = (rec.get("run_id"), rec.get("finished_at"))
            first = m.paid_once.setdefault(rec["item_id"], line_id)
            if first != line_id:
                m.paid_again.add(rec["item_id"])
        stamp = when(rec.get("finished_at"))
        if count:
            acc = m.by_shard.setdefault(home if home is not None else int(rec["item_id"], 16) % count, ShardAcc())
            acc.cost += spent
            if stamp is not None and (acc.last is None or stamp > acc.last):
                acc.last = stamp
        if stamp is not None:
            m.first = stamp if m.first is None or stamp < m.first else m.first
            m.last = stamp if m.last is None or stamp > m.last else m.last
            _span(m, rec, stamp.timestamp())
    m.damaged = len(bad)
    return m


def shard_table(m: Manifests) -> Shards | None:
    """Every shard of the job's N: its items, ok, failed, spend, last activity, and whether it runs now."""
    count = m.shard_count
    if not count:
        return None
    spec = m.view.snapshot()
    expected = spec.get("shard_items") if spec.get("shards") == count else None
    if not (isinstance(expected, list) and len(expected) == count and all(isinstance(n, int) for n in expected)):
        expected = None
    ok, failed = [0] * count, [0] * count
    for item_id, rec in m.latest.items():
        k = m.homes.get(item_id, int(item_id, 16) % count)
        (ok if rec["status"] == "ok" else failed)[k] += 1
    running = m.view.running()
    rows: list[ShardRow] = []
    for k in range(count):
        acc = m.by_shard.get(k, ShardAcc())
        lease = running.get(f"shard-{k}-of-{count}") or {}
        rows.append({
            "shard": f"{k}/{count}", "expected": expected[k] if expected else None, "items": ok[k] + failed[k],
            "ok": ok[k], "failed": failed[k], "cost_usd": money(acc.cost),
            "last_activity": acc.last.isoformat() if acc.last else None,
            "running": lease.get("running") if lease else (False if running or m.view.remote else None),
            "holder": str(lease.get("holder") or "") if lease.get("running") else "",
        })  # fmt: skip
    others = sorted(
        ("unsharded" if key == "all" else key.removeprefix("shard-").replace("-of-", "/"))
        for key, lease in running.items()
        if lease.get("running") and not key.endswith(f"-of-{count}")
    )
    return {"count": count, "rows": rows, "running": sum(1 for r in rows if r["running"]), "others_running": others}


STEP_TOLERANCE_S = 5.0  # lines are written in about the order their items finished; more out of order is the clock


def _span(m: Manifests, rec: Record, wall: float) -> None:
    """Widen the record's run's span by the time its item was in flight. Durations come from the
    monotonic clock (`since_start_s`, `elapsed_s`), placed on the wall clock once per run (its first
    line's), so a wall clock stepped back or forth mid-run does not stretch or shrink the run; a run
    of older lines whose wall times went backwards gives no rate at all (m.stepped)."""
    run = rec.get("run_id") or ""
    since = rec.get("since_start_s")
    elapsed = max(0.0, float(rec.get("elapsed_s") or 0.0))
    span = m.runs.get(run)
    if isinstance(since, int | float):
        end = m.anchors.setdefault(run, wall - since) + since
    else:
        if span is not None and wall < span[1] - STEP_TOLERANCE_S:
            m.stepped.add(run)
        end = wall
    start = end - elapsed
    if span is None:
        m.runs[run] = [start, end]
    else:
        span[0], span[1] = min(span[0], start), max(span[1], end)


def _busy_seconds(spans: list[list[float]]) -> float:
    """How long items were in flight: the union of each run's first start to last finish."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(m: Manifests) -> Summary:
    """The report of an output dir: what `runner report --json` prints.

    Item counts, failures and latency come from the latest record of each item; cost, requests
    and retries from every line, since each line stands for attempts that were made (and paid).
    Latency percentiles are nearest-rank (always an observed value)."""
    ok = failed = interrupted = recovered = 0
    kinds: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    latencies: list[float] = []
    per_line: dict[tuple[str, str], ModelLine] = {}
    var_counts: dict[str, Counter[str]] = {}
    inputs: Counter[str] = Counter()
    for rec in m.latest.values():
        key = (str(rec.get("model")), size_of(rec))
        line = per_line.setdefault(key, {"model": key[0], "image_size": key[1], "ok": 0, "failed": 0})
        if rec["status"] == "ok":
            ok += 1
            line["ok"] += 1
            recovered += rec.get("recovered", False)
            latency = rec.get("latency_s")
            if rec.get("attempts") and latency is not None:
                latencies.append(float(latency))
        else:
            failed += 1
            line["failed"] += 1
            interrupted += rec.get("interrupted", False)
            error = rec["error"]
            kinds[error["kind"]] += 1
            shown = examples.setdefault(error["kind"], [])
            message = str(error.get("message", ""))
            if len(shown) < MAX_EXAMPLES and message not in shown:
                shown.append(message)
        for name, value in (rec.get("vars") or {}).items():
            var_counts.setdefault(str(name), Counter())[str(value)] += 1
        for ref in rec.get("inputs", []):
            inputs[str(ref.get("path") or ref.get("url") or "?")] += 1
    for key in m.cost_by_line.keys() - per_line.keys():  # spent on items whose latest line moved elsewhere
        per_line[key] = {"model": key[0], "image_size": key[1], "ok": 0, "failed": 0}
    for key, line in per_line.items():
        line["cost_usd"] = money(m.cost_by_line.get(key, 0.0))
    busy_h = _busy_seconds(list(m.runs.values())) / 3600
    spec = m.view.snapshot()
    retries = sum(m.retries_by_kind.values())
    summary: Summary = {
        "output_dir": m.view.display,
        "name": spec.get("name") if isinstance(spec.get("name"), str) else None,
        "spec_items": spec.get("items") if isinstance(spec.get("items"), int) else None,
        "made_by_mock": bool(spec.get("made_by_mock")),
        "items": len(m.latest),
        "ok": ok,
        "failed": failed,
        "interrupted": interrupted,
        "recovered": recovered,
        "failures_by_kind": dict(kinds.most_common()),
        "failure_examples": {k: examples[k] for k in kinds},
        "cost_usd": money(m.cost),
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "max": max(latencies, default=None),
        },
        "percentiles": "nearest-rank over the latest ok record of each item",
        "requests": m.requests,
        "retries": retries,
        "retries_by_kind": dict(m.retries_by_kind.most_common()),
        # Over less than a minute in flight an hourly rate is noise.
        # A run whose wall clock went backwards (older lines, no monotonic time) gives no rate at all.
        "throughput_per_hour": round(ok / busy_h, 1) if busy_h >= 1 / 60 and ok and not m.stepped else None,
        "busy_s": round(busy_h * 3600, 1),
        "by_model": [per_line[k] for k in sorted(per_line)],
        "runs": len(m.runs),
        "first_finished_at": m.first.isoformat() if m.first else None,
        "last_finished_at": m.last.isoformat() if m.last else None,
        "lines": m.lines,
        "bad_lines": m.damaged,
        "vars": {name: dict(counts.most_common()) for name, counts in sorted(var_counts.items())},
        "inputs": dict(inputs.most_common(MAX_INPUTS_SHOWN)),
        "distinct_inputs": len(inputs),
        "batches": _batches(m.view),
        "generated_more_than_once": len(m.paid_again),
        "shards": shard_table(m),
    }
    chains = _chains(m.latest, m.view.snapshot())
    if chains is not None:
        summary["chains"] = chains
    return summary


def _chains(latest: dict[str, Record], snapshot: dict[str, Any]) -> ChainsSummary | None:
    """Which step edits which: from the spec the dir last ran (spec.json's `chain`), else from the
    records alone (an edit's parent is the `item_id` in its inputs)."""
    chain = snapshot.get("chain")
    parents: dict[str, str | None] = (
        {str(k): str(v) for k, v in chain.items()} if isinstance(chain, dict) and chain else {}
    )
    stale: list[str] = []
    counts: dict[str, list[int]] = {}
    for rec in latest.values():
        links = [i for i in rec.get("inputs", []) if isinstance(i.get("item_id"), str)]
        for link in links:
            parent = latest.get(str(link.get("item_id")))
            if rec["prompt_id"] not in parents or parent is not None:
                parents[rec["prompt_id"]] = parent["prompt_id"] if parent else parents.get(rec["prompt_id"])
            if parent is None or parent["status"] != "ok" or parent.get("sha256") != link.get("sha256"):
                stale.append(rec["item_id"])
        counts.setdefault(rec["prompt_id"], [0, 0])[rec["status"] != "ok"] += 1
    if not parents:
        return None
    roots = {p for p in parents.values() if p is not None}
    order = [*dict.fromkeys([*(p for p in parents.values() if p is not None and p not in parents), *parents])]
    steps: list[StepSummary] = [
        {"prompt_id": pid, "parent": parents.get(pid), "ok": counts.get(pid, [0, 0])[0],
         "failed": counts.get(pid, [0, 0])[1]}
        for pid in order
    ]  # fmt: skip
    failed_parents = sum(1 for r in latest.values() if r["prompt_id"] in roots and r["status"] != "ok")
    return {"steps": steps, "failed_parents": failed_parents, "stale": stale}


def _batches(view: View) -> BatchesSummary:
    ledger = view.ledger()
    ended = [b.ended for b in ledger.batches.values()]
    return {
        "open": [_open_batch(b) for b in ledger.open_batches()],
        "committed_usd": money(ledger.committed_usd()),
        "collected": ended.count("collected"),
        "abandoned": ended.count("abandoned"),
    }


def _open_batch(b: BatchEntry) -> OpenBatch:
    return {
        "name": b.name,
        "display_name": b.display_name,
        "state": b.state,
        "items": len(b.items),
        "submitted_at": b.prepared_at,
        "stats": b.stats,
    }
