"""Batch mode against a Google that misbehaves: answers rewritten by a proxy in front of the mock."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from .conftest import StartGateway, latest, read_manifest, run_cli, start_cli, write_spec
from .hostile import HostileServer
from .tamper import TamperProxy
from .test_batch import FAST, batch_spec, google, ledger
from .test_resume import assert_all_ok_and_intact, wait_for

StartTamper = Callable[..., TamperProxy]


def listing(path: str) -> bool:
    return path.startswith("/v1beta/batches?")


def test_a_batch_listed_twice_is_one_batch_never_cancelled(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A listing whose pages shift (a batch created meanwhile) shows a batch twice: it is one batch,
    and the one kept is never cancelled as its own duplicate."""
    gw = gateway(**FAST, batch_faults=(("create_503", 1.0),))

    def twice(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method != "GET" or not listing(path):
            return None
        page = json.loads(body)
        page["operations"] = [op for op in page.get("operations", []) for _ in range(2)]
        return status, json.dumps(page).encode()

    proxy = tamper(gw, twice)
    path = batch_spec(tmp_path, proxy.base_url, prompts=[f"stork {i}" for i in range(4)], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = google(gw)
    assert stats["cancels"] == 0 and "created twice" not in proc.stderr
    assert stats["batches_created"] == 2 and stats["double_submits"] == 0
    assert_all_ok_and_intact(tmp_path / "out", 4)


def test_a_list_that_fails_after_an_unknown_create_aborts_the_run_with_exit_3(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """Exit 1 is "some items failed"; a run that cannot look for the batch it may have created is aborted (3)."""
    gw = gateway(**FAST, batch_faults=(("create_503", 1.0),))
    broken = (500, b'{"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}')
    proxy = tamper(gw, lambda method, path, status, body: broken if listing(path) else None)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["egret"], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "cannot list batches" in proc.stderr and "boom" in proc.stderr
    assert google(gw)["batches_created"] == 1
    proc = run_cli("run", str(path), "--no-progress", "--base-url", gw.base_url)
    assert proc.returncode == 0, proc.stderr
    assert google(gw)["batches_created"] == 1
    assert_all_ok_and_intact(tmp_path / "out", 1)


def test_a_list_that_pages_in_a_loop_stops_the_run_and_buys_nothing_twice(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A create with no answer is looked up by listing; a list whose next page is always the same
    page ends with a clear error at once (not after thousands of requests), the batch left to find."""
    gw = gateway(**FAST, batch_faults=(("create_503", 1.0),))
    pages = Counter[str]()

    def loop(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method != "GET" or not listing(path):
            return None
        pages["listed"] += 1
        return status, json.dumps({**json.loads(body), "nextPageToken": "again"}).encode()

    proxy = tamper(gw, loop)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["egret"], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "cannot list batches" in proc.stderr and "page token" in proc.stderr
    assert pages["listed"] <= 3
    assert google(gw)["batches_created"] == 1 and google(gw)["cancels"] == 0
    [entry] = [e for e in ledger(tmp_path / "out") if e["event"] == "prepare"]
    assert not any(e["event"] == "abandoned" for e in ledger(tmp_path / "out"))  # the next run looks for it again
    # the next run, with a list that works, finds and collects it
    proc = run_cli("run", str(path), "--no-progress", "--base-url", gw.base_url)
    assert proc.returncode == 0, proc.stderr
    assert google(gw)["batches_created"] == 1 and entry["items"]
    assert_all_ok_and_intact(tmp_path / "out", 1)


@pytest.mark.parametrize("answer", ["nameless", "html"])
def test_a_create_answered_without_a_batch_name_is_looked_up_never_bought_again(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper, answer: str
) -> None:
    """A create that went through but whose answer names no batch (no `name`, not JSON) is an unknown
    outcome: looked up by listing. Before, the batch was polled as "" (404: gone) and bought again."""
    gw = gateway(**FAST)

    def nameless(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method != "POST" or ":batchGenerateContent" not in path or status != 200:
            return None
        if answer == "html":
            return status, b"<html><body>Batch created.</body></html>"
        return status, json.dumps({k: v for k, v in json.loads(body).items() if k != "name"}).encode()

    proxy = tamper(gw, nameless)
    path = batch_spec(tmp_path, proxy.base_url, prompts=[f"plover {i}" for i in range(5)], max_requests=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = google(gw)
    assert stats["batches_created"] == 2 and stats["double_submits"] == 0
    assert all(e["name"].startswith("batches/") for e in ledger(tmp_path / "out") if e["event"] == "created")
    assert_all_ok_and_intact(tmp_path / "out", 5)


def test_a_404_for_a_batch_the_list_still_shows_is_not_taken_for_gone(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A get answered 404 (a flaky front end) for a batch that is alive: it is checked against the
    list before its items are given back, so nothing is bought twice."""
    gw = gateway(**FAST)
    gets = Counter[str]()
    missing = (404, b'{"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}}')

    def flaky(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method != "GET" or not path.startswith("/v1beta/batches/"):
            return None
        gets[path] += 1
        return missing if gets[path] <= 2 else None

    proxy = tamper(gw, flaky)
    path = batch_spec(tmp_path, proxy.base_url, prompts=[f"avocet {i}" for i in range(5)], max_requests=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "no longer knows" not in proc.stderr
    stats = google(gw)
    assert stats["batches_created"] == 2 and stats["double_submits"] == 0
    assert_all_ok_and_intact(tmp_path / "out", 5)


def test_a_404_for_every_batch_at_a_wrong_base_url_leaves_them_open(tmp_path: Path, gateway: StartGateway) -> None:
    """`--base-url` with a typo: every get and the list are 404. The batches stay open (the run aborts,
    exit 3), never given up while they run on the server."""
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"avocet {i}" for i in range(4)], max_requests=2)
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    wrong = gw.base_url.replace("/v1beta", "/v1betta")
    proc = run_cli("run", str(path), "--no-progress", "--base-url", wrong)
    assert proc.returncode == 3, proc.stderr
    assert "no longer knows" not in proc.stderr
    assert not any(e["event"] == "abandoned" for e in ledger(tmp_path / "out"))
    assert google(gw)["batches_created"] == 2


def test_cancel_with_a_list_that_fails_says_so_per_batch_and_cancels_the_rest(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A batch whose create went unanswered is looked up by listing to be cancelled; a list that fails
    is said for that batch, the named ones are cancelled, and nothing ends as an internal error (70)."""
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"godwit {i}" for i in range(4)], max_requests=2)
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    out = tmp_path / "out"
    first = next(e for e in ledger(out) if e["event"] == "prepare")
    lines = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]
    kept = [e for e in lines if not (e["event"] == "created" and e["id"] == first["id"])]  # a kill before it was named
    (out / "batches.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    broken = (503, b'{"error": {"code": 503, "message": "list is down", "status": "UNAVAILABLE"}}')
    proxy = tamper(gw, lambda method, path, status, body: broken if listing(path) else None)
    proc = run_cli("cancel", str(out), "--base-url", proxy.base_url, "--key-env", "RUNNER_TEST_KEY")
    assert proc.returncode == 1, proc.stderr  # one batch it could not cancel: run it again
    assert f"{first['display_name']}: could not look it up on the server: " in proc.stderr
    assert proc.stderr.count(": cancelled (2 items") == 1 and google(gw)["cancels"] == 1


def test_a_disk_that_fills_while_results_download_stops_the_run_and_keeps_the_batch(
    tmp_path: Path, gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results file goes to the output dir's disk; a full disk there is the run's "cannot write
    to output dir" (exit 3), not a bug (70), and the batch stays open: the next run collects it."""
    from runner.backends.batch import api

    gw = gateway(**FAST)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(api, "os", SimpleNamespace(fsync=full))
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"curlew {i}" for i in range(3)], max_requests=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "cannot write to output dir" in proc.stderr and "disk is full" in proc.stderr
    assert not any(e["event"] in ("collected", "abandoned") for e in ledger(tmp_path / "out"))
    monkeypatch.undo()
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert google(gw)["batches_created"] == 1
    assert_all_ok_and_intact(tmp_path / "out", 3)


def test_a_disk_that_fills_while_a_requests_file_is_written_stops_the_run_sending_nothing(
    tmp_path: Path, gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.backends.batch import backend

    gw = gateway(**FAST)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "x.requests.jsonl")

    monkeypatch.setattr(backend, "write_requests", full)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"curlew {i}" for i in range(3)], max_requests=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "cannot write to output dir" in proc.stderr and "disk is full" in proc.stderr
    assert [e["event"] for e in ledger(tmp_path / "out")] == ["prepare", "abandoned"]
    assert google(gw)["uploads"] == 0
    monkeypatch.undo()
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert_all_ok_and_intact(tmp_path / "out", 3)


@pytest.mark.parametrize("scenario", ["endless", "trickle"])
def test_a_batch_api_answer_that_never_ends_is_cut_off_not_held(
    tmp_path: Path, gateway: StartGateway, hostile: HostileServer, scenario: str
) -> None:
    """The batch calls (get, list, create) read whole answers: an endless one filled memory (11 GB in
    40 s) and a trickled one held the run far past timeout_s. Both are cut: a capped body, and
    timeout_s for the whole request. The batch stays open."""
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=["dunlin"], max_requests=2, timeout_s=1)
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    hostile.every = scenario
    base = hostile.base_url.removesuffix("/v1") + "/v1beta"
    started = time.monotonic()
    proc = run_cli("run", str(path), "--no-progress", "--no-wait", "--base-url", base, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no answer" in proc.stderr and "1 batch stays open" in proc.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "line",
    [
        {"event": "prepare", "id": "x1", "items": ["not-an-item-id"], "reserved_usd": 0.1},
        {"event": "prepare", "id": "x2", "items": [], "reserved_usd": "abc"},
        {"event": "prepare", "id": "x3", "items": ["ab"], "reserved_usd": 1e400},
        {"event": "state", "id": "FIRST", "state": "RUNNING", "stats": [1, 2]},
        {"event": "created", "id": "FIRST", "name": 7},
        {"event": "ref", "sha256": "ab", "file": "files/1", "uri": 5},
    ],
)
def test_a_ledger_line_of_the_wrong_types_is_set_aside_not_a_crash(
    tmp_path: Path, gateway: StartGateway, line: dict[str, object]
) -> None:
    """batches.jsonl changed by hand or by a bad disk: a line whose fields have the wrong types is
    damaged (as one that is not JSON is), never an internal error or an infinite commitment."""
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=["knot", "ruff"], max_requests=2)
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    out = tmp_path / "out"
    first = ledger(out)[0]["id"]
    with (out / "batches.jsonl").open("a") as f:
        f.write(json.dumps(line).replace('"FIRST"', json.dumps(first)) + "\n")
    report = run_cli("report", str(out), "--json")
    assert report.returncode == 0, report.stderr
    batches = json.loads(report.stdout)["batches"]
    assert batches["committed_usd"] == pytest.approx(0.134, abs=0.11)
    assert any(b["name"] and b["name"].startswith("batches/") for b in batches["open"])
    proc = run_cli("run", str(path), "--no-progress", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert google(gw)["batches_created"] == 1


def test_a_succeeded_batch_whose_answer_names_no_results_file_is_looked_at_again(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """SUCCEEDED is paid for: an answer that leaves out `responsesFile` once gave the batch up ("not
    the items' fault") and bought its items again, up to max_attempts times."""
    gw = gateway(**FAST)
    stripped = Counter[str]()

    def no_file(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method != "GET" or not path.startswith("/v1beta/batches/"):
            return None
        op = json.loads(body)
        if not op.get("done") or stripped[path] >= 2:
            return None
        stripped[path] += 1
        op.pop("response", None)
        op.get("metadata", {}).pop("output", None)
        return status, json.dumps(op).encode()

    proxy = tamper(gw, no_file)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["shag", "gannet"], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "no results file named" in proc.stderr
    assert google(gw)["batches_created"] == 1 and google(gw)["paid"] == 2
    assert_all_ok_and_intact(tmp_path / "out", 2)


def test_an_open_batch_whose_items_are_all_recorded_is_closed_by_the_next_run(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A kill after a batch's lines are committed and before its `collected` event: the rerun found
    "nothing to do" and left the batch open for ever (the report's "1 open, $0.201 committed", the
    budget counting it on top of what its lines cost). It is collected again, nothing recorded twice."""
    gw = gateway(**FAST)
    keep_files = (500, b'{"error": {"code": 500, "message": "later"}}')  # the kill came before the files went
    proxy = tamper(gw, lambda *answer: None, lambda method, path: keep_files if method == "DELETE" else None)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["scaup", "smew", "teal"], max_requests=3)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    events = [e for e in ledger(out) if e["event"] not in ("collected", "cleaned")]
    (out / "batches.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert report["batches"]["open"] == [] and report["batches"]["committed_usd"] == 0
    assert report["batches"]["collected"] == 1
    assert len(read_manifest(out)) == 3 and google(gw)["batches_created"] == 1 and google(gw)["paid"] == 3


def test_a_results_file_that_is_gone_gives_the_items_back_instead_of_waiting_for_ever(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """Collected days after a --no-wait, a batch's results file may be gone from the Files API (it
    keeps files 48 h): the download is refused every time. A waiting run tried again at every poll,
    for ever; now, refused GONE_AFTER times in a row, the items go back and are submitted again."""
    gw = gateway(**FAST)
    gone: list[str] = []

    def expired(method: str, path: str) -> tuple[int, bytes] | None:
        if ":download" not in path:
            return None
        gone[:] = gone or [path.split("?")[0]]  # the first batch's results file only
        if path.split("?")[0] != gone[0]:
            return None
        return (
            403,
            b'{"error": {"code": 403, "message": "You do not have permission to access the File or it may not exist.", "status": "PERMISSION_DENIED"}}',
        )

    proxy = tamper(gw, lambda *answer: None, expired)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["pochard", "eider"], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "is gone" in proc.stderr and proc.stderr.count("download failed") == 2
    assert google(gw)["batches_created"] == 2
    assert_all_ok_and_intact(tmp_path / "out", 2)


def test_shards_running_at_once_each_collect_their_own_batches(tmp_path: Path, gateway: StartGateway) -> None:
    """Every shard read every shard's ledger and took over all open batches: two shards at once
    raced to each other's results files (the first deletes it), and the loser gave the items back
    (bought twice) or tried the gone file for ever. A shard collects the batches of its own ledger."""
    gw = gateway(flavor="gemini", batch_latency_s=1.0)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"grebe {i}" for i in range(8)], max_requests=2)
    out = tmp_path / "out"
    first = start_cli("run", str(path), "--no-progress", "--shard", "0/2")
    try:
        wait_for(lambda: any(e["event"] == "created" for e in ledger(out, "batches.shard-0-of-2.jsonl")))
        second = run_cli("run", str(path), "--no-progress", "--shard", "1/2", timeout=60)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, err + second.stderr
    mine = {e["name"] for e in ledger(out, "batches.shard-0-of-2.jsonl") if e["event"] == "created"}
    assert not any(name in second.stderr for name in mine)  # shard 1 never touched shard 0's batches
    assert set(google(gw)["paid_keys"].values()) == {1} and google(gw)["double_submits"] == 0
    assert len(latest(out)) == 8 and all(r["status"] == "ok" for r in latest(out).values())


def test_an_upload_with_no_answer_stops_the_run_not_a_quiet_exit_0(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """The second batch's upload gets no answer (the connection dropped): the run exited 0, "every
    item ok", with none of 6 items made and without waiting for the batch already submitted."""
    gw = gateway(**FAST)
    starts = Counter[str]()

    def drop_second(method: str, path: str) -> tuple[int, bytes] | None:
        if method != "POST" or not path.startswith("/upload/v1beta/files") or "upload_id" in path:
            return None
        starts["upload"] += 1
        return (0, b"") if starts["upload"] == 2 else None

    proxy = tamper(gw, lambda *answer: None, drop_second)
    path = batch_spec(tmp_path, proxy.base_url, prompts=[f"murre {i}" for i in range(6)], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "batch not submitted" in proc.stderr and "Server disconnected" in proc.stderr
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert google(gw)["batches_created"] == 3 and google(gw)["double_submits"] == 0
    assert_all_ok_and_intact(tmp_path / "out", 6)


def test_a_batch_found_after_an_unanswered_create_is_kept_when_its_get_fails(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """Found by listing after a create with no answer, then a get with no answer either: the batch
    was given up as "could not be submitted" though it runs on the server, and bought again."""
    gw = gateway(**FAST, batch_faults=(("create_503", 1.0),))
    gets = Counter[str]()

    def drop_first_get(method: str, path: str) -> tuple[int, bytes] | None:
        if method != "GET" or not path.startswith("/v1beta/batches/"):
            return None
        gets["get"] += 1
        return (0, b"") if gets["get"] == 1 else None

    proxy = tamper(gw, lambda *answer: None, drop_first_get)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["razorbill", "puffin"], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not any(e["event"] == "abandoned" for e in ledger(tmp_path / "out"))
    assert google(gw)["creates"] == 1 and google(gw)["batches_created"] == 1
    assert_all_ok_and_intact(tmp_path / "out", 2)


def test_an_upload_url_on_another_host_never_gets_the_key(
    tmp_path: Path, gateway: StartGateway, tamper: Callable[..., TamperProxy], hostile: HostileServer
) -> None:
    gw = gateway(**FAST)
    elsewhere = hostile.base_url.removesuffix("/v1") + "/upload?upload_id=1"

    def redirect_upload(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes, dict[str, str]] | None:
        return (status, body, {"X-Goog-Upload-URL": elsewhere}) if path.endswith("/upload/v1beta/files") else None

    proxy = tamper(gw, redirect_upload)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["a stork"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "a URL on another host (127.0.0.1): the key is not sent there" in proc.stderr
    assert hostile.stats()["requests"] == {} and hostile.stats()["auth"] == []  # nothing reached it
    assert google(gw)["batches_created"] == 0


def test_a_results_line_over_max_response_mb_fails_its_item_and_is_not_bought_again(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway(pad_bytes=100_000, **FAST)  # each image ~100 KB: a results line of ~135 KB of base64
    path = batch_spec(tmp_path, gw.base_url, prompts=["a crane", "a rail"], max_response_mb=0.05)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    recs = latest(tmp_path / "out")
    assert len(recs) == 2 and all(r["status"] == "failed" for r in recs.values())
    assert all("larger than max_response_mb" in r["error"]["message"] for r in recs.values())
    assert google(gw)["batches_created"] == 1  # as an interactive answer over the cap: not bought again this run


def test_a_results_file_too_big_for_its_lines_is_not_read_to_the_end(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """A results file of the first batch that is far bigger than its lines could be (a server that
    streams without end): the download stops at 2 x lines x max_response_mb, not at a full disk;
    refused three times, its items go back and are bought again (as a results file that is gone)."""
    gw = gateway(**FAST)
    first: list[str] = []

    def endless(method: str, path: str) -> tuple[int, bytes] | None:
        if ":download" not in path:
            return None
        first[:] = first or [path.split("?")[0]]
        return (200, b'{"key": "' + b"0" * (4 << 20) + b'"}\n') if path.split("?")[0] == first[0] else None

    proxy = tamper(gw, lambda *answer: None, endless)
    path = batch_spec(tmp_path, proxy.base_url, prompts=["smew", "teal"], max_requests=2, max_response_mb=0.5)
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "cannot be read (the results file" in proc.stderr and "passes 3 MiB" in proc.stderr, proc.stderr
    assert google(gw)["batches_created"] == 2
    assert_all_ok_and_intact(tmp_path / "out", 2)


def _images(out: Path) -> list[Path]:
    return [p for p in (out / "images").rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_ctrl_c_while_collecting_finishes_the_batch_and_records_what_it_saved(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway(**FAST)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"gull {i}" for i in range(300)], max_requests=300)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: (out / "images").exists() and len(_images(out)) >= 20, timeout=60)
    proc.send_signal(signal.SIGINT)  # once: what is in hand is finished and recorded
    _, err = proc.communicate(timeout=90)
    assert proc.returncode in (0, 130), err
    assert proc.returncode == 0 or "for the batch being collected" in err, err
    recs = latest(out)
    # every image saved has its line (the collection was cancelled mid-way and dropped them all)
    assert sum(r["status"] == "ok" for r in recs.values()) == len(_images(out)) > 0, err
    assert google(gw)["batches_created"] == 1


def test_a_kill_while_collecting_then_a_results_file_gone_buys_no_saved_image_again(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    gw = gateway(**FAST)
    gone: dict[str, Any] = {"on": False, "first": None}

    def refuse(method: str, path: str) -> tuple[int, bytes] | None:
        if ":download" not in path:
            return None
        gone["first"] = gone["first"] or path.split("?")[0]
        if gone["on"] and path.split("?")[0] == gone["first"]:
            return 403, b'{"error": {"code": 403, "message": "gone", "status": "PERMISSION_DENIED"}}'
        return None

    proxy = tamper(gw, lambda *answer: None, refuse)
    path = batch_spec(tmp_path, proxy.base_url, prompts=[f"tern {i}" for i in range(300)], max_requests=300)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: (out / "images").exists() and len(_images(out)) >= 20, timeout=60)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    on_disk = {p.stem for p in _images(out)}
    gone["on"] = True  # the next run comes days later: the Files API no longer has the results
    proc2 = run_cli("run", str(path), "--no-progress", timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    assert_all_ok_and_intact(out, 300)
    paid = google(gw)["paid_keys"]
    assert not [k for k in on_disk if paid.get(k, 0) > 1], "an image already on disk was bought again"


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        ("https://generativelanguage.googleapis.com/v1beta", "https://generativelanguage.googleapis.com"),
        ("https://gw.example.com", "https://gw.example.com"),  # was "https:/": uploads went to host "upload"
        ("http://localhost:4000/", "http://localhost:4000"),
        ("https://gw.example.com/google/v1beta/", "https://gw.example.com/google"),
    ],
)
def test_uploads_and_downloads_stay_on_the_host_of_base_url(base_url: str, root: str) -> None:
    from runner.backends.batch.api import ApiError, GoogleBatchApi

    api = GoogleBatchApi(base_url, "k")
    assert api.root == root and api.version == "v1beta"
    with pytest.raises(ApiError, match="another host"):
        api._own("https://elsewhere.example/upload/v1beta/files")
    api._own(f"{root}/download/v1beta/files/x:download")


def test_cancel_never_sends_a_variable_or_to_a_host_that_only_the_ledger_names(
    tmp_path: Path, gateway: StartGateway, hostile: HostileServer
) -> None:
    """An output dir is data (a bucket many machines write): a ledger line naming another variable
    and another host must not make `runner cancel` send that variable's value there."""
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=["a bittern"], max_requests=2)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    ledger_file = out / "batches.jsonl"
    text = ledger_file.read_text().replace(gw.base_url, hostile.base_url.replace("/v1", "/v1beta"))
    ledger_file.write_text(text.replace('"RUNNER_TEST_KEY"', '"MY_CLOUD_SECRET"'))
    env = {"MY_CLOUD_SECRET": "hunter2-cloud"}
    proc = run_cli("cancel", str(out), env=env)
    assert proc.returncode == 2 and "give --base-url" in proc.stderr, proc.stderr
    proc = run_cli("cancel", str(out), "--base-url", gw.base_url, env=env)
    assert proc.returncode == 2 and "give --key-env MY_CLOUD_SECRET to send it" in proc.stderr, proc.stderr
    assert hostile.stats()["requests"] == {} and hostile.stats()["auth"] == []
    assert google(gw)["cancels"] == 0


def test_a_restart_right_after_a_kill_in_create_waits_for_the_late_batch_not_buying_it_twice(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper
) -> None:
    """Killed while its create is in flight, restarted at once (a supervisor): the batch Google made
    may not be in the list yet. The restart waits out the grace from the upload and lists again."""
    import threading

    gw = gateway(**FAST)
    created, release = threading.Event(), threading.Event()
    hide = {"lists": 1}  # the restart's first list does not show it yet

    def slow_google(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if method == "POST" and ":batchGenerateContent" in path and not release.is_set():
            created.set()
            release.wait(30)  # made on the server; its answer never reaches the killed run
        if method == "GET" and listing(path) and created.is_set() and release.is_set() and hide["lists"]:
            hide["lists"] -= 1
            return status, json.dumps({"operations": []}).encode()
        return None

    proxy = tamper(gw, slow_google)
    # poll_s 1: the grace (ten polls, at most 30 s) leaves the restart time to come
    path = write_spec(tmp_path, proxy.base_url, api_format="gemini", mode="batch", prompts=["a shag", "a gannet"],
                      batch={"max_requests": 2, "poll_s": 1})  # fmt: skip
    proc = start_cli("run", str(path), "--no-progress")
    assert created.wait(60)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    release.set()
    again = run_cli("run", str(path), "--no-progress", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "may not be listed yet: looking again" in again.stderr, again.stderr
    assert_all_ok_and_intact(tmp_path / "out", 2)
    stats = google(gw)
    assert stats["batches_created"] == 1 and set(stats["paid_keys"].values()) == {1}
