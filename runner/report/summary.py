"""What a run produced, summed up from its manifests: counts, failures, retries, cost, latency, throughput."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ..errors import UsageError
from ..output import View
from ..output.ledger import BatchEntry
from ..output.manifest import iter_records
from ..pricing import money, usd
from ..record import Record, size_of, supersedes
from ..safety import printable

MAX_EXAMPLES = 3  # distinct messages kept per failure kind


class Latency(TypedDict):
    p50: float | None
    p95: float | None
    max: float | None


class ModelLine(TypedDict):
    model: str
    image_size: str
    ok: int
    failed: int
    cost_usd: NotRequired[float]


class OpenBatch(TypedDict):
    name: str | None  # batches/... (None: prepared by a run that stopped before the server answered)
    display_name: str
    state: str | None  # as last seen by a run
    items: int
    submitted_at: str
    stats: dict[str, Any]


class BatchesSummary(TypedDict):
    """Google Batch Mode: what the ledger (output/ledger.py) says is submitted and not yet collected."""

    open: list[OpenBatch]
    committed_usd: float  # what the open batches may still cost
    collected: int  # batches collected into the manifest
    abandoned: int  # batches that never ran or ended without results (their items went back)


class StepSummary(TypedDict):
    prompt_id: str
    parent: str | None  # the step it edits the images of (None: a first step)
    ok: int
    failed: int


class ChainsSummary(TypedDict):
    """Edit chains: counts per step, and edits made from a parent image that is no longer the parent's."""

    steps: list[StepSummary]
    failed_parents: int  # parents whose failure keeps their edits from being sent
    stale: list[str]  # item_ids of edits whose source image was made again since (their parent's image changed)


class Summary(TypedDict):
    """What `runner report --json` prints: `summarize`'s keys, then the quality's (runner.quality.analyze)
    and, with --html, the gallery's. Gallery, card and text all read this one shape."""

    output_dir: str
    name: str | None
    spec_items: int | None
    made_by_mock: bool
    items: int
    ok: int
    failed: int
    interrupted: int
    recovered: int
    failures_by_kind: dict[str, int]
    failure_examples: dict[str, list[str]]
    cost_usd: float
    latency_s: Latency
    percentiles: str
    requests: int
    retries: int
    retries_by_kind: dict[str, int]
    throughput_per_hour: float | None
    busy_s: float
    by_model: list[ModelLine]
    runs: int
    first_finished_at: str | None
    last_finished_at: str | None
    lines: int
    bad_lines: int
    vars: dict[str, dict[str, int]]
    inputs: dict[str, int]
    distinct_inputs: int
    # which records count: the items of the output dir's spec now (engine/current.py), or every one
    older_records: NotRequired[int]  # items with records that the spec no longer asks for, left out
    older_cost_usd: NotRequired[float]  # what their lines cost
    records_note: NotRequired[str]  # why every record counts (no spec, spec gone, --all-records)
    sources: NotRequired[list[dict[str, str]]]  # where the images came from: {base_url ("mock"), api_format}
    batches: BatchesSummary
    chains: NotRequired[ChainsSummary]
    # runner.quality.analyze
    duplicates: NotRequired[list[list[str]]]
    near_duplicates: NotRequired[list[list[str]] | None]
    near_duplicates_note: NotRequired[str]
    near_threshold: NotRequired[int]
    size_mismatches: NotRequired[list[str]]
    size_off: NotRequired[list[str]]
    pixel_sizes: NotRequired[list[dict[str, Any]]]
    uniform: NotRequired[list[str] | None]
    unreadable: NotRequired[list[str]]
    hashes: NotRequired[dict[str, Any] | None]
    unchanged_edits: NotRequired[list[str]]
    gallery: NotRequired[dict[str, Any]]


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


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None  # naive and aware stamps cannot be compared


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


def read_manifests(view: View, wanted: Callable[[str], bool] | None = None) -> Manifests:
    """Every line of the output dir's manifests; with `wanted`, the lines of other items are only
    counted as older records (their items and cost), not summed up."""
    require_manifest(view)
    m = Manifests(view)
    bad: list[int] = []
    for rec in iter_records(view.path, bad):
        m.lines += 1
        if wanted is not None and not wanted(rec["item_id"]):
            m.older.add(rec["item_id"])
            m.older_cost += float(rec.get("cost_usd") or 0.0)
            continue
        old = m.latest.get(rec["item_id"])
        if old is None or supersedes(rec["status"], old["status"], functools.partial(view.source.intact, old)):
            m.latest[rec["item_id"]] = rec
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
        stamp = _when(rec.get("finished_at"))
        if stamp is not None:
            m.first = stamp if m.first is None or stamp < m.first else m.first
            m.last = stamp if m.last is None or stamp > m.last else m.last
            _span(m, rec, stamp.timestamp())
    m.damaged = len(bad)
    return m


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
    }
    chains = _chains(m.latest)
    if chains is not None:
        summary["chains"] = chains
    return summary


def _chains(latest: dict[str, Record]) -> ChainsSummary | None:
    """From the records alone: an edit's parent is the `item_id` in its inputs."""
    parents: dict[str, str | None] = {}
    stale: list[str] = []
    counts: dict[str, list[int]] = {}
    for rec in latest.values():
        links = [i for i in rec.get("inputs", []) if isinstance(i.get("item_id"), str)]
        for link in links:
            parent = latest.get(str(link.get("item_id")))
            parents[rec["prompt_id"]] = parent["prompt_id"] if parent else parents.get(rec["prompt_id"])
            if parent is None or parent["status"] != "ok" or parent.get("sha256") != link.get("sha256"):
                stale.append(rec["item_id"])
        counts.setdefault(rec["prompt_id"], [0, 0])[rec["status"] != "ok"] += 1
    if not parents:
        return None
    roots = {p for p in parents.values() if p is not None}
    steps: list[StepSummary] = [
        {"prompt_id": pid, "parent": parents.get(pid), "ok": counts[pid][0], "failed": counts[pid][1]}
        for pid in counts
        if pid in parents or pid in roots
    ]
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


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _count(n: int, noun: str) -> str:
    """`1 group`, `2 groups`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def format_text(summary: Summary) -> str:
    """A compact human-readable table of a summary (every server-made string made printable)."""
    lat = summary.get("latency_s") or {}
    items = f"{summary['items']}  (ok {summary['ok']}, failed {summary['failed']}"
    items += f", of which {summary['interrupted']} interrupted" if summary.get("interrupted") else ""
    items += f"; {summary['recovered']} recovered from disk" if summary.get("recovered") else ""
    left = (summary.get("spec_items") or 0) - summary["items"]
    items += f"; {left} of the {summary['spec_items']} in the spec not yet run" if left > 0 else ""
    rows: list[tuple[str, str]] = [
        ("items", items + ")"),
        ("cost", usd(summary["cost_usd"])),
        ("requests", f"{summary['requests']}  ({summary['retries']} retries)"),
        ("latency", f"p50 {_seconds(lat.get('p50'))}  p95 {_seconds(lat.get('p95'))}  max {_seconds(lat.get('max'))}"),
    ]
    if summary.get("retries_by_kind"):
        rows.append(("retried", ", ".join(f"{k} {n}" for k, n in summary["retries_by_kind"].items())))
    if summary.get("throughput_per_hour") is not None:
        rows.append(("throughput", f"{summary['throughput_per_hour']:,.1f} images/hour in flight"))
    rows.append(("runs", str(summary["runs"])))
    if summary.get("older_records"):
        rows.append(("left out", f"{_count(summary['older_records'], 'older item')} whose records the spec no longer "
                     f"asks for ({usd(summary.get('older_cost_usd') or 0.0)} spent on them); --all-records counts them"))  # fmt: skip
    elif summary.get("records_note"):
        rows.append(("records", str(summary["records_note"])))
    batches = summary.get("batches")
    if batches and (batches["open"] or batches["collected"]):
        open_ = batches["open"]
        said = f"{batches['collected']} collected, {len(open_)} open"
        if open_:
            waiting = sum(b["items"] for b in open_)
            said += f" ({waiting} items, {usd(batches['committed_usd'])} committed, not yet collected)"
        rows.append(("batches", said))
    if summary.get("bad_lines"):
        rows.append(("bad lines", f"{summary['bad_lines']} unreadable manifest line(s) skipped (damaged or cut off)"))
    width = max(len(k) for k, _ in rows)
    title = f"report: {summary.get('name') or ''} {summary.get('output_dir', '')}".replace("  ", " ")
    title += " (images made by the built-in mock)" if summary.get("made_by_mock") else ""
    text = [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows]

    by_model = summary.get("by_model") or []
    if by_model:
        table = [("model", "size", "ok", "failed", "cost")]
        table += [(m["model"], m["image_size"], str(m["ok"]), str(m["failed"]), usd(m["cost_usd"])) for m in by_model]
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        text.append("")
        for r in table:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [
                c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)
            ]
            text.append("  " + "  ".join(cells).rstrip())

    open_batches = summary["batches"]["open"] if summary.get("batches") else []
    if open_batches:
        text += ["", "open batches (runner run collects them; runner cancel OUT cancels them):"]
        for b in open_batches[:20]:
            seen = b["stats"]
            progress = (
                f" {seen.get('successfulRequestCount', 0)} ok, {seen.get('pendingRequestCount', '?')} pending,"
                if seen
                else ""
            )
            text.append(f"  {b['name'] or b['display_name'] + ' (not yet known to be created)'}: {b['state'] or 'submitted'},"
                        f" {b['items']} items,{progress} submitted {b['submitted_at'][:19].replace('T', ' ')} UTC")  # fmt: skip
        if len(open_batches) > 20:
            text.append(f"  ... {len(open_batches) - 20} more")

    if summary.get("failures_by_kind"):
        text += ["", "failures:"]
        for kind, count in summary["failures_by_kind"].items():
            text.append(f"  {kind}: {count}")
            for message in summary.get("failure_examples", {}).get(kind, []):
                text.append(f"    e.g. {' '.join(str(message).split())[:160]}")

    if summary.get("vars"):
        text += ["", "vars:"]
    for name, counts in (summary.get("vars") or {}).items():
        shown = ", ".join(f"{v} ({n})" for v, n in list(counts.items())[:8])
        more = f", … {len(counts) - 8} more" if len(counts) > 8 else ""
        text.append(f"  {name}: {shown}{more}")
    if summary.get("inputs"):
        text += ["", f"reference images ({summary['distinct_inputs']} distinct):"]
        text += [f"  {ref}: {n} items" for ref, n in list(summary["inputs"].items())[:8]]
    return printable("\n".join(text))


def format_quality(summary: Summary) -> str:
    """The quality part of the report (runner.quality.analyze's keys) as text."""

    def ids(items: list[str]) -> str:
        shown = ", ".join(items[:3])
        return shown + (f", … {len(items) - 3} more" if len(items) > 3 else "")

    text = ["", "quality:"]
    dups = summary.get("duplicates") or []
    text.append(
        f"  byte-identical images: {_count(len(dups), 'group')} ({sum(map(len, dups))} items), e.g. {ids(dups[0])}"
        if dups
        else "  byte-identical images: none"
    )
    near = summary.get("near_duplicates")
    if near is None:
        text.append(f"  near duplicates: {summary.get('near_duplicates_note', '')}")
    else:
        groups = f"{_count(len(near), 'group')} ({sum(map(len, near))} items), e.g. {ids(near[0])}" if near else "none"
        text.append(f"  near duplicates: {groups} ({summary.get('near_duplicates_note', '')})")
    for found, what in ((summary.get("size_mismatches"), "not the aspect ratio asked for (beyond 2%)"),
                        (summary.get("size_off"), "far from the size asked for (the built-in mock makes them 1/8 size)"),
                        (summary.get("uniform"), "a single colour"), (summary.get("unreadable"), "unreadable"),
                        (summary.get("unchanged_edits"), "edits that gave their source image back")):  # fmt: skip
        if found:
            text.append(f"  {what}: {len(found)}, e.g. {ids(found)}")
    for row in summary.get("pixel_sizes") or []:
        sizes = ", ".join(f"{wh} ({n})" for wh, n in list(row["sizes"].items())[:4])
        text.append(f"  {row['model']} {row['aspect_ratio']} {row['image_size']}: {sizes}")
    return printable("\n".join(text))
