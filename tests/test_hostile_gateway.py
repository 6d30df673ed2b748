"""A gateway that lies, stalls, floods and echoes: every answer costs at most its own item, never the run."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from .conftest import KEY, cli_env, run_cli, write_spec
from .hostile import MALFORMED, TRICKLE_S, HostileServer

GOOD = ["a red fox in snow", "a heron at dawn"]
PRICE = 0.134  # nanobanana_pro 1K, per image
Kind = str | tuple[str, ...] | None  # the failure kind(s) an item may end with; None: ok


def bad_prompt(marker: str) -> str:
    return f"the hostile one [hostile:{marker}]"


def _refuse(token: str) -> Any:
    raise ValueError(f"not strict JSON: {token}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text}")
    return value


def strings(obj: Any) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def strict_records(out: Path) -> list[dict[str, Any]]:
    """Every manifest line, each required to be valid UTF-8, strict finite JSON, and free of lone surrogates."""
    records = []
    for path in sorted(out.glob("manifest*.jsonl")):
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            text = raw.decode("utf-8")  # raises on invalid UTF-8
            rec = json.loads(text, parse_constant=_refuse, parse_float=_finite)
            for s in strings(rec):
                s.encode("utf-8")  # raises on a lone surrogate written as a \\ud800 escape
            assert isinstance(rec, dict), f"{path.name}:{n}"
            records.append(rec)
    return records


def assert_key_nowhere(out: Path, *outputs: str) -> None:
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    for text in outputs:
        assert KEY not in text


def control_chars(text: str) -> list[str]:
    return sorted({repr(c) for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"})


def run_against(
    tmp_path: Path,
    server: HostileServer,
    markers: Mapping[str, Kind],
    env: dict[str, str] | None = None,
    **fields: Any,
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    """Run GOOD plus one prompt per marker; check the common contract; return the run and records by prompt.

    `markers` maps a scenario to the failure kind(s) its item may end with (None: ok). Checked:
    one line per item, good items ok with whole images, exit 1 if anything failed else 0, strict
    lines, no traceback, no key anywhere; then a rerun pays again only for items without an image."""
    prompts = [*GOOD, *(bad_prompt(m) for m in markers)]
    spec = {"max_attempts": 2, "timeout_s": 5, "concurrency": 4, **fields}
    path = write_spec(tmp_path, server.base_url, prompts=prompts, **spec)
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--no-progress", env=env, timeout=90)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    failing = any(kind is not None for kind in markers.values())
    assert proc.returncode == (1 if failing else 0), proc.stderr[-3000:]
    records = strict_records(out)
    by_prompt = {r["prompt"]: r for r in records}
    assert sorted(r["prompt"] for r in records) == sorted(prompts), "one line per item"
    expected: dict[str, Kind] = {**dict.fromkeys(GOOD), **{bad_prompt(m): k for m, k in markers.items()}}
    for prompt, kind in expected.items():
        rec = by_prompt[prompt]
        if kind is None:
            assert rec["status"] == "ok", rec
            data = (out / rec["image_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == rec["sha256"] and data.startswith(b"\x89PNG")
        else:
            kinds = (kind,) if isinstance(kind, str) else kind
            assert rec["status"] == "failed" and rec["error"]["kind"] in kinds, (prompt, rec.get("error"))
    assert_key_nowhere(out, proc.stdout, proc.stderr)
    assert server.stats()["auth"] == [f"Bearer {KEY}"]  # the key was sent, so it could have leaked
    before = server.stats()["requests"]
    again = run_cli("run", str(path), "--no-progress", env=env, timeout=90)
    assert "Traceback" not in again.stderr and again.returncode in (0, 1), again.stderr[-3000:]
    after = server.stats()["requests"]
    paid_again = [p for p, kind in expected.items() if kind is None and after.get(p) != before.get(p)]
    assert paid_again == [], "a rerun bought again what it had"
    assert_key_nowhere(out, again.stdout, again.stderr)
    return proc, by_prompt


# 1. lone surrogates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["surrogate_text", "surrogate_id", "surrogate_usage"])
def test_a_lone_surrogate_in_an_answer_is_replaced_and_the_item_is_ok(
    tmp_path: Path, hostile: HostileServer, marker: str
) -> None:
    run_against(tmp_path, hostile, {marker: None})
    assert hostile.stats()["paid"][bad_prompt(marker)] == 1


def test_a_lone_surrogate_in_an_error_message_is_a_safe_bad_request(tmp_path: Path, hostile: HostileServer) -> None:
    _, recs = run_against(tmp_path, hostile, {"surrogate_400": "bad_request"})
    rec = recs[bad_prompt("surrogate_400")]
    assert rec["error"]["status"] == 400 and "request" in rec["error"]["message"]


# 2. malformed HTTP ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["default", "httpx"])
@pytest.mark.parametrize("marker", MALFORMED)
def test_a_malformed_http_answer_fails_its_item_only(
    tmp_path: Path, hostile: HostileServer, marker: str, transport: str
) -> None:
    env = {"RUNNER_HTTP_TRANSPORT": "httpx"} if transport == "httpx" else None
    run_against(tmp_path, hostile, {marker: ("invalid_response", "connection")}, env=env)


# 3. memory -----------------------------------------------------------------------------------------------------


# The child reports its own peak (VmHWM of its address space): a child's ru_maxrss also counts
# the memory of the pytest worker it was forked from (the kernel keeps the pre-exec high-water
# mark), which is hundreds of MB once `datasets` has been imported there.
_MEASURED = (
    "import atexit, runpy, sys\n"
    "out = sys.argv[1]\n"
    "def peak():\n"
    "    with open(out, 'w') as f:\n"
    "        f.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
    "atexit.register(peak)\n"
    "sys.argv = ['runner', *sys.argv[2:]]\n"
    "runpy.run_module('runner', run_name='__main__')\n"
)


def run_measured(path: Path, timeout: float = 90) -> tuple[int, str, int]:
    """Run the CLI; (exit code, stderr, peak RSS in MB of the runner process itself)."""
    err_path, peak_path = path.parent / "stderr.txt", path.parent / "peak.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURED, str(peak_path), "run", str(path), "--no-progress"],
            stdout=subprocess.DEVNULL, stderr=err, env=cli_env(),
        )  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode, err_path.read_text(), int(peak_path.read_text()) // 1024


@pytest.mark.parametrize("marker", ["endless", "gzip_bomb"])
def test_an_answer_past_max_response_mb_fails_its_item_and_memory_stays_bounded(
    tmp_path: Path, hostile: HostileServer, marker: str
) -> None:
    prompts = [*GOOD, bad_prompt(marker)]
    path = write_spec(
        tmp_path, hostile.base_url, prompts=prompts, max_attempts=2, timeout_s=5, concurrency=3, max_response_mb=8
    )
    code, err, peak_mb = run_measured(path)
    assert "Traceback" not in err and code == 1, err[-3000:]
    assert peak_mb < 400, f"peak RSS {peak_mb} MB"
    recs = {r["prompt"]: r for r in strict_records(tmp_path / "out")}
    assert all(recs[p]["status"] == "ok" for p in GOOD)
    bad = recs[bad_prompt(marker)]
    assert bad["status"] == "failed" and bad["error"]["kind"] == "invalid_response", bad
    assert "max_response_mb" in bad["error"]["message"]


# 4. the key echoed back ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "kind"), [("echo_text", None), ("echo_id", None), ("echo_usage", None), ("echo_400", "bad_request")]
)
def test_a_key_echoed_by_the_server_is_written_nowhere(
    tmp_path: Path, hostile: HostileServer, marker: str, kind: str | None
) -> None:
    run_against(tmp_path, hostile, {marker: kind})
    report = run_cli("report", str(tmp_path / "out"))
    report_json = run_cli("report", str(tmp_path / "out"), "--json")
    assert report.returncode == report_json.returncode == 0, report.stderr
    assert_key_nowhere(tmp_path / "out", report.stdout, report.stderr, report_json.stdout, report_json.stderr)


# 5. terminal escapes -------------------------------------------------------------------------------------------


def test_escape_sequences_from_the_server_never_reach_a_terminal(tmp_path: Path, hostile: HostileServer) -> None:
    markers = {"escape_ok": None, "escape_400": "bad_request", "escape_text_only": "no_image"}
    run, _ = run_against(tmp_path, hostile, markers)
    out = str(tmp_path / "out")
    report = run_cli("report", out)
    report_json = run_cli("report", out, "--json")
    assert report.returncode == report_json.returncode == 0, report.stderr
    for name, text in [
        ("run stdout", run.stdout), ("run stderr", run.stderr), ("report stdout", report.stdout),
        ("report stderr", report.stderr), ("report --json stderr", report_json.stderr),
    ]:  # fmt: skip
        assert control_chars(text) == [], name
    parsed = json.loads(report_json.stdout)
    assert [c for s in strings(parsed) for c in control_chars(s)] == [], "report --json values"


# 6. odd JSON and many images -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "kind"),
    [
        ("deep_json", "invalid_response"),
        ("inf_usage", None),
        ("choices_dict", "invalid_response"),
        ("content_number", "invalid_response"),
        ("message_null", "invalid_response"),
        ("fake_png", "invalid_response"),
    ],
)
def test_odd_json_answers(tmp_path: Path, hostile: HostileServer, marker: str, kind: str | None) -> None:
    run_against(tmp_path, hostile, {marker: kind})


def test_the_budget_counts_every_image_of_an_answer(tmp_path: Path, hostile: HostileServer) -> None:
    budget, per_answer = 3.0, 10 * PRICE
    prompts = [f"{bad_prompt('images10')} {i}" for i in range(8)]
    path = write_spec(
        tmp_path, hostile.base_url, prompts=prompts, concurrency=1, max_attempts=2, max_cost_usd=budget, timeout_s=5
    )
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert "Traceback" not in proc.stderr and proc.returncode == 3, proc.stderr[-3000:]
    records = strict_records(tmp_path / "out")
    oks = [r for r in records if r["status"] == "ok"]
    assert oks and all(len(r.get("extra_images", [])) == 9 for r in oks)
    assert all(r["cost_usd"] == pytest.approx(per_answer) for r in oks)
    paid = sum(hostile.stats()["paid"].values())
    assert paid == len(oks), "every answer paid for is recorded"
    spent = sum(r["cost_usd"] for r in records)
    assert spent == pytest.approx(paid * per_answer)
    assert spent <= budget + per_answer + 1e-9, f"spent {spent} of a {budget} budget"
    # Only the first answer can surprise: once one has shown 10 images, the budget reserves 10 a request.
    assert spent <= budget + 1e-9, f"spent {spent} of a {budget} budget after learning 10 images an answer"


# 7. a trickle --------------------------------------------------------------------------------------------------


def test_an_answer_that_trickles_times_out_within_timeout_s(tmp_path: Path, hostile: HostileServer) -> None:
    timeout_s = 2.0
    t0 = time.monotonic()
    run_against(tmp_path, hostile, {"trickle": "timeout"}, timeout_s=timeout_s)
    assert time.monotonic() - t0 < 4 * (timeout_s + 1) + 10  # two runs of two attempts, plus start-up
    held = hostile.stats()["held"][bad_prompt("trickle")]
    assert len(held) >= 2
    assert max(held) < timeout_s + 1 + 2 * TRICKLE_S, held


def test_items_waiting_for_a_slot_when_answers_grow_are_not_sent_past_the_budget(
    tmp_path: Path, hostile: HostileServer
) -> None:
    # Two items reserve one image's price each; the first is sent and its answer holds 10
    # images; the second is still waiting for its rate slot (5 s later). It must not go out
    # on its old reservation: one more 10-image answer would pass the budget.
    budget = 12 * PRICE
    prompts = [f"{bad_prompt('images10')} {i}" for i in range(4)]
    path = write_spec(
        tmp_path, hostile.base_url, prompts=prompts, concurrency=2, requests_per_minute=12, max_cost_usd=budget
    )
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert proc.returncode == 3 and "budget reached" in proc.stderr, proc.stderr[-3000:]
    assert sum(hostile.stats()["paid"].values()) == 1
    records = strict_records(tmp_path / "out")
    assert [r["status"] for r in records] == ["ok"] and records[0]["cost_usd"] == pytest.approx(10 * PRICE)


def test_a_retry_that_no_longer_fits_the_budget_ends_its_item(tmp_path: Path, hostile: HostileServer) -> None:
    # One item's answer holds 10 images while the other waits 3 s (Retry-After) to retry: by
    # then a 10-image answer no longer fits, so the retry is not sent and the item ends there,
    # recorded as interrupted, rather than going through its remaining attempts' waits. (The busy
    # one first: with a budget, the first request goes alone until an answer shows its images.)
    prompts = [f"{bad_prompt('busy3')} b", f"{bad_prompt('images10')} a"]
    path = write_spec(
        tmp_path, hostile.base_url, prompts=prompts, concurrency=2, max_attempts=3, max_cost_usd=12 * PRICE
    )
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert proc.returncode == 3 and "budget reached" in proc.stderr, proc.stderr[-3000:]
    by_prompt = {r["prompt"][-1]: r for r in strict_records(tmp_path / "out")}
    assert by_prompt["a"]["status"] == "ok"
    busy = by_prompt["b"]
    assert busy["status"] == "failed" and busy["interrupted"] and busy["attempts"] == 1
    assert busy["retried"] == {"server_error": 1}
