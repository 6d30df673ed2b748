"""The report as text: the summary's table, the shards, the open batches, the edit chains, the quality."""

from __future__ import annotations

from datetime import datetime

from ..engine.progress import plural
from ..pricing import usd
from ..safety import printable
from .shapes import Summary
from .summary import when


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
    if summary.get("older_records"):
        rows.append(("left out", f"{plural(summary['older_records'], 'older item')} whose records the spec no longer "
                     f"asks for ({usd(summary.get('older_cost_usd') or 0.0)} spent on them); --all-records counts them"))  # fmt: skip
    elif summary.get("records_note"):
        rows.append(("records", str(summary["records_note"])))
    batches = summary.get("batches")
    if batches and (batches["open"] or batches["collected"]):
        open_ = batches["open"]
        said = f"{batches['collected']} collected, {len(open_)} open"
        if open_:
            waiting = sum(b["items"] for b in open_)
            said += f" ({plural(waiting, 'item')}, {usd(batches['committed_usd'])} committed, not yet collected)"
        rows.append(("batches", said))
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
                        f" {plural(b['items'], 'item')},{progress} submitted {b['submitted_at'][:19].replace('T', ' ')} UTC")  # fmt: skip
        if len(open_batches) > 20:
            text.append(f"  ... {len(open_batches) - 20} more")

    text += _chain_lines(summary)
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
        text += [f"  {ref}: {plural(n, 'item')}" for ref, n in list(summary["inputs"].items())[:8]]
    return printable("\n".join(text))


def _chain_lines(summary: Summary) -> list[str]:
    chains = summary.get("chains")
    if not chains:
        return []
    lines = ["", "edit chains (each step edits the images of the step it names):"]
    for step in chains["steps"]:
        edits = f" edits {step['parent']}" if step["parent"] else ""
        lines.append(f"  {step['prompt_id']}{edits}: {step['ok']} ok, {step['failed']} failed")
    if chains["failed_parents"]:
        lines.append(f"  {plural(chains['failed_parents'], 'parent')} failed: their edits are not sent "
                     "(a rerun retries retryable failures; --retry-failed the rest)")  # fmt: skip
    if chains["stale"]:
        lines.append(f"  {plural(len(chains['stale']), 'edit')} made from a parent image that was made again "
                     f"since, e.g. {', '.join(chains['stale'][:3])}")  # fmt: skip
    return lines


def _ago(stamp: str | None, now: datetime) -> str:
    then = when(stamp)
    if then is None:
        return "-"
    seconds = max(0.0, (now - then).total_seconds())
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
        f"  byte-identical images: {plural(len(dups), 'group')} ({sum(map(len, dups))} items), e.g. {ids(dups[0])}"
        if dups
        else "  byte-identical images: none"
    )
    near = summary.get("near_duplicates")
    if near is None:  # no Pillow (or --no-quality): the pixel checks are not made either
        what = "near duplicates, single-colour images" if summary.get("uniform") is None else "near duplicates"
        text.append(f"  {what}: {summary.get('near_duplicates_note', '')}")
    else:
        groups = f"{plural(len(near), 'group')} ({sum(map(len, near))} items), e.g. {ids(near[0])}" if near else "none"
        text.append(f"  near duplicates: {groups} ({summary.get('near_duplicates_note', '')})")
    for found, what in ((summary.get("size_mismatches"), "not the aspect ratio asked for (beyond 2%)"),
                        (summary.get("size_off"), "far from the size asked for (under half or over twice the model's)"),
                        (summary.get("uniform"), "a single colour"), (summary.get("unreadable"), "unreadable"),
                        (summary.get("unchanged_edits"), "edits that gave their source image back")):  # fmt: skip
        if found:
            text.append(f"  {what}: {len(found)}, e.g. {ids(found)}")
    for row in summary.get("pixel_sizes") or []:
        sizes = ", ".join(f"{wh} ({n})" for wh, n in list(row["sizes"].items())[:4])
        text.append(f"  {row['model']} {row['aspect_ratio']} {row['image_size']}: {sizes}")
    return printable("\n".join(text))
