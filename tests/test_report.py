"""runner report / gallery / export, from output dirs written by hand (and a real headless browser)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import UsageError
from runner.output import open_view
from runner.record import Record
from runner.report.summary import percentile, read_manifests, summarize
from runner.report.text import format_text

from .conftest import item_id, manifest_line, run_cli

EVIL = "<img src=x onerror=alert(1)><script>alert(2)</script>"


def report_of(out: Path) -> dict[str, Any]:
    with open_view(out) as view:
        return summarize(read_manifests(view))


def record(out: Path, n: int, *, status: str = "ok", **fields: Any) -> Record:
    return manifest_line(out, n, status=status, usage={"prompt_tokens": 9, "completion_tokens": 1359, "total_tokens": 1368},
                         **fields)  # fmt: skip


def write_lines(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    with path.open("a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.write(tail)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Four ok items and two failed ones, over two manifests, with one superseded line and a torn tail."""
    out = tmp_path / "out dir#1"  # a space and a '#': image URLs must be quoted
    out.mkdir()
    t = "2026-11-25T{}+00:00"
    main = [
        record(out, 1, prompt="a cat in ink style", prompt_id="animals", vars_={"subject": "cat", "style": "ink"},
               latency=10.0, at=t.format("08:00:00.000")),
        record(out, 2, status="failed", attempts=5, latency=None, at=t.format("08:10:00.000"),
               error={"kind": "rate_limited", "status": 429, "message": "slow down"}),
        record(out, 3, prompt=EVIL, prompt_id="evil", model="nanobanana", config={"aspect_ratio": "1:1"},
               vars_={"subject": "<b>dog</b>", "style": "ink"}, cost=0.039, latency=30.0, at=t.format("08:30:00.000")),
        record(out, 4, status="failed", prompt=EVIL, prompt_id="evil2", latency=None, at=t.format("08:40:00.000"),
               error={"kind": "content_filter", "status": None, "message": "<b>blocked</b> by filter"}),
        record(out, 5, status="failed", model="nanobanana_2", config={"aspect_ratio": "1:1", "image_size": "4K"},
               attempts=5, latency=None, at=t.format("08:50:00.000"),
               error={"kind": "server_error", "status": 503, "message": "overloaded"}),
        # item 2 again in a later run: this line supersedes its failure
        record(out, 2, attempts=2, latency=20.0, at=t.format("09:00:00.000"), run="run2"),
    ]  # fmt: skip
    write_lines(out / "manifest.jsonl", main, tail='{"item_id": "' + item_id(6)[:7])  # killed mid-write
    shard = [
        record(out, 7, config={"aspect_ratio": "4:3"}, latency=40.0, at=t.format("10:00:00.000"), run="run2"),
    ]
    write_lines(out / "manifest.shard-1-of-2.jsonl", shard)
    return out


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_exact_numbers(out: Path) -> None:
    s = report_of(out)
    assert (s["items"], s["ok"], s["failed"]) == (6, 4, 2)
    assert s["failures_by_kind"] == {"content_filter": 1, "server_error": 1}  # rate_limited was superseded
    assert s["failure_examples"] == {"content_filter": ["<b>blocked</b> by filter"], "server_error": ["overloaded"]}
    assert s["cost_usd"] == pytest.approx(0.134 * 3 + 0.039)
    # ok latencies 10, 20, 30, 40: nearest rank, p50 is the 2nd value (not an interpolated 25)
    assert s["latency_s"] == {"p50": 20.0, "p95": 40.0, "max": 40.0}
    assert s["requests"] == 1 + 5 + 1 + 1 + 5 + 2 + 1
    assert s["retries"] == 0 + 4 + 0 + 0 + 4 + 1 + 0
    # 4 ok images over the time items were in flight: run1 07:59:49-08:50, run2 08:59:39-10:00 (issue 11)
    assert s["throughput_per_hour"] == 2.2
    assert s["runs"] == 2
    assert s["bad_lines"] == 1
    assert s["vars"] == {"style": {"ink": 2}, "subject": {"cat": 1, "<b>dog</b>": 1}}
    assert s["by_model"] == [
        {"model": "nanobanana", "image_size": "1K", "ok": 1, "failed": 0, "cost_usd": 0.039},
        {"model": "nanobanana_2", "image_size": "4K", "ok": 0, "failed": 1, "cost_usd": 0.0},
        {"model": "nanobanana_pro", "image_size": "1K", "ok": 1, "failed": 0, "cost_usd": 0.134},
        {"model": "nanobanana_pro", "image_size": "2K", "ok": 2, "failed": 1, "cost_usd": 0.268},
    ]
    json.dumps(s)  # what --json prints


def test_summarize_nothing_ok_and_single_stamp(tmp_path: Path) -> None:
    write_lines(
        tmp_path / "manifest.jsonl",
        [record(tmp_path, 1, status="failed", latency=None, error={"kind": "auth", "status": 401, "message": "m"})],
    )
    s = report_of(tmp_path)
    assert s["latency_s"] == {"p50": None, "p95": None, "max": None}
    assert s["throughput_per_hour"] is None
    assert s["failures_by_kind"] == {"auth": 1}
    assert "auth: 1" in format_text(s)


def test_failure_examples_are_distinct_and_at_most_three(tmp_path: Path) -> None:
    recs = [
        record(tmp_path, n, status="failed", error={"kind": "timeout", "status": None, "message": f"m{n % 4}"})
        for n in range(10)
    ]
    write_lines(tmp_path / "manifest.jsonl", recs)
    assert report_of(tmp_path)["failure_examples"] == {"timeout": ["m0", "m1", "m2"]}


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([float(v) for v in range(1, 21)], 95) == 19.0  # ceil(0.95 * 20) = 19th
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_no_manifest_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no manifest"):
        report_of(tmp_path)
    with pytest.raises(UsageError, match="no such directory"):
        report_of(tmp_path / "missing")
    assert run_cli("export", str(tmp_path)).returncode == 2


def test_format_text(out: Path) -> None:
    text = format_text(report_of(out))
    assert "ok 4, failed 2" in text
    assert "$0.441" in text
    assert "p50 20.0s" in text and "p95 40.0s" in text
    assert "content_filter: 1" in text and "server_error: 1" in text
    assert "nanobanana_pro  2K" in text
    assert "1 unreadable manifest line" in text
