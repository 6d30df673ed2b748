"""What a run produced, summed up from its manifests: counts, failures, retries, cost, latency, throughput."""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from ..errors import UsageError
from ..output import View
from ..output.manifest import manifest_paths, read_records, shard_of
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


class ShardRow(TypedDict):
    shard: str  # K/N
    expected: int | None  # the items of this shard in the spec the dir last ran (spec.json)
    items: int  # items of this shard with a record
    ok: int
    failed: int
    cost_usd: float  # every line of its items (what was paid for them)
    last_activity: str | None  # its items' latest line
    running: bool | None  # a live lease (remote) or a held lock (local, this machine); None: cannot tell
    holder: str


class Shards(TypedDict):
    """The shards of the job's N (the latest sharded run's), one row per K: which array tasks to rerun."""

    count: int
    rows: list[ShardRow]
    running: int  # shards of this N running now
    others_running: list[str]  # runners of another N, or unsharded, running now


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
    generated_more_than_once: int  # items with two or more paid images (two runners of one shard, or a redo)
    shards: Shards | None
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
    first: datetime | None = None
    last: datetime | None = None
    shard_count: int | None = None  # the N whose shards the report shows
    by_shard: dict[int, ShardAcc] = field(default_factory=dict)
    paid_once: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # item -> its first paid ok line
    paid_again: set[str] = field(default_factory=set)  # items with another paid ok line


def _shard_count(view: View, paths: list[Path]) -> int | None:
    """The job's N: the one the dir last ran with (spec.json), else the largest its manifests name."""
    recorded = view.snapshot().get("shards")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    counts = [found[1] for p in paths if (found := shard_of(p)) is not None]
    return max(counts, default=None)


def read_manifests(view: View) -> Manifests:
    require_manifest(view)
    m = Manifests(view)
    bad: list[int] = []
    paths = manifest_paths(view.path)
    m.shard_count = count = _shard_count(view, paths)
    for rec in (rec for path in paths for rec in read_records(path, bad)):
        m.lines += 1
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
        if rec["status"] == "ok" and attempts:  # an image paid for here (a recovered line bought nothing)
            line_id = (rec.get("run_id"), rec.get("finished_at"))
            first = m.paid_once.setdefault(rec["item_id"], line_id)
            if first != line_id:
                m.paid_again.add(rec["item_id"])
        stamp = _when(rec.get("finished_at"))
        if count:
            acc = m.by_shard.setdefault(int(rec["item_id"], 16) % count, ShardAcc())
            acc.cost += spent
            if stamp is not None and (acc.last is None or stamp > acc.last):
                acc.last = stamp
        if stamp is not None:
            m.first = stamp if m.first is None or stamp < m.first else m.first
            m.last = stamp if m.last is None or stamp > m.last else m.last
            end = stamp.timestamp()
            start = end - max(0.0, float(rec.get("elapsed_s") or 0.0))
            span = m.runs.setdefault(rec.get("run_id") or "", [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
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
        k = int(item_id, 16) % count
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
    return {
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
        "throughput_per_hour": round(ok / busy_h, 1) if busy_h >= 1 / 60 and ok else None,
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
        "generated_more_than_once": len(m.paid_again),
        "shards": shard_table(m),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


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
    if summary.get("generated_more_than_once"):
        rows.append((
            "paid twice",
            f"{summary['generated_more_than_once']} items generated more than once (two runners of one shard at "
            "once, or an image lost and made again)",
        ))  # fmt: skip
    rows.append(("runs", str(summary["runs"])))
    if summary.get("bad_lines"):
        rows.append(("bad lines", f"{summary['bad_lines']} unreadable manifest line(s) skipped (damaged or cut off)"))
    width = max(len(k) for k, _ in rows)
    title = f"report: {summary.get('name') or ''} {summary.get('output_dir', '')}".replace("  ", " ")
    title += " (images made by the built-in mock)" if summary.get("made_by_mock") else ""
    text = [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows]

    text += _shard_lines(summary)
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


def _ago(stamp: str | None, now: datetime) -> str:
    when = _when(stamp)
    if when is None:
        return "-"
    seconds = max(0.0, (now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _shard_lines(summary: Summary) -> list[str]:
    shards = summary.get("shards")
    if not shards:
        return []
    now = datetime.now().astimezone()
    head = f"shards: {shards['count']} (--shard K/{shards['count']}), {shards['running']} running now"
    if shards["others_running"]:
        head += f"; also running: {', '.join(shards['others_running'])}"
    table = [("shard", "ok", "of", "failed", "cost", "last activity", "running")]
    for r in shards["rows"]:
        running = {True: "yes " + r["holder"], False: "no", None: "?"}[r["running"]].strip()
        expected = "-" if r["expected"] is None else str(r["expected"])
        table.append((r["shard"], str(r["ok"]), expected, str(r["failed"]), usd(r["cost_usd"]),
                      _ago(r["last_activity"], now), running))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["", head]
    for row in table:
        cells = [c.ljust(w) if i in (0, 5, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_quality(summary: Summary) -> str:
    """The quality part of the report (runner.quality.analyze's keys) as text."""

    def ids(items: list[str]) -> str:
        shown = ", ".join(items[:3])
        return shown + (f", … {len(items) - 3} more" if len(items) > 3 else "")

    text = ["", "quality:"]
    dups = summary.get("duplicates") or []
    text.append(
        f"  byte-identical images: {len(dups)} groups ({sum(map(len, dups))} items), e.g. {ids(dups[0])}"
        if dups
        else "  byte-identical images: none"
    )
    near = summary.get("near_duplicates")
    if near is None:
        text.append(f"  near duplicates: {summary.get('near_duplicates_note', '')}")
    else:
        groups = f"{len(near)} groups ({sum(map(len, near))} items)" if near else "none"
        text.append(f"  near duplicates: {groups} ({summary.get('near_duplicates_note', '')})")
    for found, what in ((summary.get("size_mismatches"), "not the aspect ratio asked for (beyond 2%)"),
                        (summary.get("size_off"), "far from the size asked for (under half or over twice the model's)"),
                        (summary.get("uniform"), "a single colour"), (summary.get("unreadable"), "unreadable")):  # fmt: skip
        if found:
            text.append(f"  {what}: {len(found)}, e.g. {ids(found)}")
    for row in summary.get("pixel_sizes") or []:
        sizes = ", ".join(f"{wh} ({n})" for wh, n in list(row["sizes"].items())[:4])
        text.append(f"  {row['model']} {row['aspect_ratio']} {row['image_size']}: {sizes}")
    return printable("\n".join(text))
