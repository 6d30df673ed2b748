"""What a run produced, summed up from its manifest: counts, failures, cost, latency, throughput."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UsageError
from .manifest import iter_records, manifest_paths, supersedes
from .models import MODELS, effective_size

MAX_EXAMPLES = 3  # distinct messages kept per failure kind


def require_manifest(out: Path) -> None:
    """Raise a UsageError unless `out` is an output dir with at least one manifest."""
    if not out.is_dir():
        raise UsageError(f"{out}: no such directory (expected a runner output directory)")
    if not manifest_paths(out):
        raise UsageError(f"{out}: no manifest.jsonl here; is this the output_dir of a run?")


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it.

    Always one of the values (no interpolation); None for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def size_of(rec: dict[str, Any]) -> str:
    """The image size a record was produced (and billed) at; the sent value for an unknown model."""
    config = rec.get("image_config") if isinstance(rec.get("image_config"), dict) else {}
    sent = config.get("image_size")
    model = rec.get("model")
    if isinstance(model, str) and model in MODELS:
        return effective_size(model, sent if isinstance(sent, str) else None)
    return str(sent) if sent is not None else "?"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None  # naive and aware stamps cannot be compared


def analyze(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(summary, latest record per item_id) in one pass over every manifest of `out`."""
    require_manifest(out)
    bad: list[int] = []
    last: dict[str, dict[str, Any]] = {}
    cost = 0.0
    retries = requests = lines = 0
    runs: set[str] = set()
    first: datetime | None = None
    final: datetime | None = None
    stamps = 0
    cost_by_line: dict[tuple[str, str], float] = {}
    for rec in iter_records(out, bad):
        lines += 1
        if supersedes(rec, last.get(rec["item_id"])):
            last[rec["item_id"]] = rec
        spent = _number(rec.get("cost_usd")) or 0.0
        cost += spent
        key = (str(rec.get("model")), size_of(rec))
        cost_by_line[key] = cost_by_line.get(key, 0.0) + spent
        attempts = rec.get("attempts")
        if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts > 0:
            requests += attempts
            retries += attempts - 1
        if isinstance(rec.get("run_id"), str):
            runs.add(rec["run_id"])
        stamp = _when(rec.get("finished_at"))
        if stamp is not None:
            stamps += 1
            first = stamp if first is None or stamp < first else first
            final = stamp if final is None or stamp > final else final

    ok = failed = 0
    kinds: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    latencies: list[float] = []
    per_line: dict[tuple[str, str], dict[str, Any]] = {}
    var_counts: dict[str, Counter[str]] = {}
    for rec in last.values():
        key = (str(rec.get("model")), size_of(rec))
        line = per_line.setdefault(key, {"model": key[0], "image_size": key[1], "ok": 0, "failed": 0})
        if rec.get("status") == "ok":
            ok += 1
            line["ok"] += 1
            latency = _number(rec.get("latency_s"))
            if latency is not None:
                latencies.append(latency)
        else:
            failed += 1
            line["failed"] += 1
            error = rec.get("error") if isinstance(rec.get("error"), dict) else {}
            kind = str(error.get("kind") or "unknown")
            kinds[kind] += 1
            message = error.get("message")
            shown = examples.setdefault(kind, [])
            if isinstance(message, str) and len(shown) < MAX_EXAMPLES and message not in shown:
                shown.append(message)
        if isinstance(rec.get("vars"), dict):
            for name, value in rec["vars"].items():
                var_counts.setdefault(str(name), Counter())[str(value)] += 1
    for key in cost_by_line.keys() - per_line.keys():  # spent on items whose latest line moved elsewhere
        per_line[key] = {"model": key[0], "image_size": key[1], "ok": 0, "failed": 0}
    for key, line in per_line.items():
        line["cost_usd"] = round(cost_by_line.get(key, 0.0), 6)

    span_h = (final - first).total_seconds() / 3600 if first is not None and final is not None else 0.0
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "items": len(last),
        "ok": ok,
        "failed": failed,
        "failures_by_kind": dict(kinds.most_common()),
        "failure_examples": {k: examples[k] for k in kinds},
        "cost_usd": round(cost, 6),
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "max": max(latencies) if latencies else None,
        },
        "percentiles": "nearest-rank over the latest ok record of each item",
        "requests": requests,
        "retries": retries,
        "throughput_per_hour": round(ok / span_h, 2) if stamps >= 2 and span_h > 0 else None,
        "by_model": [per_line[k] for k in sorted(per_line)],
        "runs": len(runs),
        "lines": lines,
        "bad_lines": len(bad),
        "vars": {name: dict(counts.most_common()) for name, counts in sorted(var_counts.items())},
    }
    return summary, last


def summarize(out: Path) -> dict[str, Any]:
    """The report of an output dir (see analyze): what `runner report --json` prints.

    Item counts, failures and latency come from the latest record of each item; cost, requests
    and retries from every line, since each line stands for attempts that were made (and paid).
    Latency percentiles are nearest-rank (always an observed value).
    """
    return analyze(out)[0]


def _money(value: float) -> str:
    return f"${value:,.2f}" if value >= 100 else f"${value:.3f}"  # per-image prices need the 3rd digit


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def format_text(summary: dict[str, Any]) -> str:
    """A compact human-readable table of a summary."""
    lat = summary.get("latency_s") or {}
    rows: list[tuple[str, str]] = [
        ("items", f"{summary['items']}  (ok {summary['ok']}, failed {summary['failed']})"),
        ("cost", _money(summary["cost_usd"])),
        ("requests", f"{summary['requests']}  ({summary['retries']} retries)"),
        ("latency", f"p50 {_seconds(lat.get('p50'))}  p95 {_seconds(lat.get('p95'))}  max {_seconds(lat.get('max'))}"),
    ]
    if summary.get("throughput_per_hour") is not None:
        rows.append(("throughput", f"{summary['throughput_per_hour']:,.1f} images/hour"))
    rows.append(("runs", str(summary["runs"])))
    if summary.get("bad_lines"):
        rows.append(("bad lines", f"{summary['bad_lines']} unreadable manifest line(s) skipped"))
    width = max(len(k) for k, _ in rows)
    text = [f"report: {summary.get('output_dir', '')}"]
    text += [f"  {k.ljust(width)}  {v}" for k, v in rows]

    by_model = summary.get("by_model") or []
    if by_model:
        table = [("model", "size", "ok", "failed", "cost")]
        table += [
            (m["model"], m["image_size"], str(m["ok"]), str(m["failed"]), _money(m["cost_usd"])) for m in by_model
        ]
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
                text.append(f"    e.g. {message[:160]}")

    if summary.get("vars"):
        text += ["", "vars:"]
    for name, counts in (summary.get("vars") or {}).items():
        shown = ", ".join(f"{v} ({n})" for v, n in list(counts.items())[:8])
        more = f", … {len(counts) - 8} more" if len(counts) > 8 else ""
        text.append(f"  {name}: {shown}{more}")
    return "\n".join(text)
