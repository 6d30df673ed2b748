"""Google's own API and its Batch Mode against the mock: same items as interactive at half the price, every end of a batch, kills."""

from __future__ import annotations

import json
import random
import re
import shlex
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartGateway, latest, png, read_manifest, run_cli, start_cli, write_spec
from .test_resume import assert_all_ok_and_intact, wait_for

FAST = {"batch_latency_s": 0.15, "flavor": "gemini"}


def batch_spec(tmp_path: Path, base_url: str, *, max_requests: int = 3, **fields: Any) -> Path:
    fields.setdefault("prompts", [f"a heron, take {i}" for i in range(7)])
    return write_spec(
        tmp_path, base_url, api_format="gemini", mode="batch", batch={"max_requests": max_requests, "poll_s": 0.05},
        **fields,
    )  # fmt: skip


def ledger(out: Path, name: str = "batches.jsonl") -> list[dict[str, Any]]:
    path = out / name
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def google(gw: Any) -> dict[str, Any]:
    return dict(gw.stats()["google"])


def test_batch_and_interactive_give_the_same_items_at_half_the_price(tmp_path: Path, gateway: StartGateway) -> None:
    """The same templated job with reference images, through generateContent and through batches."""
    gw = gateway(**FAST)
    refs = tmp_path / "refs"
    refs.mkdir()
    for name, rgb in (("mug", (200, 30, 30)), ("lamp", (30, 200, 30))):
        (refs / f"{name}.png").write_bytes(png(6, 4, rgb))
    prompts = [{"id": "scene", "template": "the {product} on {surface}", "images": ["refs/{product}.png"],
                "vars": {"product": ["mug", "lamp"], "surface": ["marble", "oak", "sand"]}}]  # fmt: skip
    common: dict[str, Any] = {"prompts": prompts, "images": ["refs/mug.png"], "params": {"seed": 11}}
    path = batch_spec(tmp_path, gw.base_url, **common)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    batch = latest(out)
    assert len(batch) == 6 and all(r["status"] == "ok" and r["batch"].startswith("batches/") for r in batch.values())
    assert {r["batch"] for r in batch.values()}.__len__() == 2  # 6 items, 3 a batch
    stats = google(gw)
    # two input files, and each distinct reference image uploaded once (not inlined in every line)
    assert stats["uploads"] == 2 + 2 and stats["double_submits"] == 0
    assert stats["deleted_files"] == 4 and stats["files"] == 2  # inputs and results gone; the refs stay for reuse

    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "refs").symlink_to(refs)
    inter = write_spec(tmp_path / "i", gw.base_url, api_format="gemini", **common)
    proc = run_cli("run", str(inter), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    interactive = latest(tmp_path / "i" / "out")
    assert sorted(interactive) == sorted(batch)  # the same item ids...
    for item_id, rec in interactive.items():
        twin = batch[item_id]
        assert rec["sha256"] == twin["sha256"] and rec["inputs"] == twin["inputs"] and rec["params"] == twin["params"]
        assert "batch" not in rec and rec["cost_usd"] == pytest.approx(2 * twin["cost_usd"])  # ...at half the price
    # the estimate halves too, and says results take up to a day
    est = json.loads(run_cli("estimate", str(path), "--json", "--out", str(tmp_path / "fresh")).stdout)
    est_i = json.loads(run_cli("estimate", str(inter), "--json", "--out", str(tmp_path / "fresh")).stdout)
    assert est["estimated_cost_usd"] == pytest.approx(est_i["estimated_cost_usd"] / 2)
    assert est["estimated_time_s"] == 24 * 3600 and any("24 h" in w for w in est["warnings"])
    # the key went in a header, never in a URL
    assert google(gw)["key_in_url"] == 0


def test_line_failures_take_their_kinds_and_retryable_ones_are_resubmitted(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway(**FAST)
    prompts = ["fine", "refused [fault:content_filter]", "words [fault:text_only]", "bad [fault:400]",
               "flaky [fault:500x1]", "blocked [fault:prompt_blocked]"]  # fmt: skip
    path = batch_spec(tmp_path, gw.base_url, prompts=prompts, max_requests=10)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    recs = {r["prompt"].split(" ")[0]: r for r in latest(tmp_path / "out").values()}
    assert recs["fine"]["status"] == recs["flaky"]["status"] == "ok"
    assert recs["flaky"]["attempts"] == 2 and recs["flaky"]["retried"] == {"server_error": 1}
    kinds = {k: r["error"]["kind"] for k, r in recs.items() if r["status"] == "failed"}
    assert kinds == {
        "refused": "content_filter",
        "words": "no_image",
        "bad": "bad_request",
        "blocked": "prompt_blocked",
    }
    assert google(gw)["batches_created"] == 2  # the flaky line went again in a batch of its own
    report = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert report["batches"]["collected"] == 2 and report["batches"]["open"] == []


def test_missing_cut_and_doubled_lines_in_any_order(tmp_path: Path, gateway: StartGateway) -> None:
    faults = (("missing", 0.25), ("truncate", 0.15), ("duplicate", 0.2))
    gw = gateway(**FAST, batch_faults=faults, seed=4)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"owl {i}" for i in range(16)], max_requests=16, max_attempts=8)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert_all_ok_and_intact(out, 16)  # each item recorded ok once, whatever came twice
    stats = google(gw)
    assert stats["batches_created"] > 1  # the missing and cut ones went again
    assert set(stats["paid_keys"].values()) == {1}  # a doubled line was paid (and recorded) once
    assert "no whole line" in proc.stderr and "keys it never held" not in proc.stderr  # none came: not said


@pytest.mark.parametrize("fault", ["expired", "failed"])
def test_a_batch_that_ends_without_results_gives_its_items_back(
    tmp_path: Path, gateway: StartGateway, fault: str
) -> None:
    gw = gateway(**FAST)
    prompts = [f"a fox [fault:batch_{fault}x1]", "a fox in the rain"]
    path = batch_spec(tmp_path, gw.base_url, prompts=prompts, max_requests=5)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"ended {fault.upper()}, not the items' fault" in proc.stderr
    assert_all_ok_and_intact(tmp_path / "out", 2)
    events = Counter(e["event"] for e in ledger(tmp_path / "out"))
    assert events["abandoned"] == 1 and events["collected"] == 1
    assert all(n == 1 for n in google(gw)["paid_keys"].values())


def test_images_saved_but_never_recorded_are_recorded_from_disk_not_bought_again(
    tmp_path: Path, gateway: StartGateway
) -> None:
    """A kill between a batch's images and its lines, after the results are gone from the server:
    the next run records the items from their image files and submits none of them."""
    gw = gateway(**FAST)
    path = batch_spec(tmp_path, gw.base_url, max_requests=4)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    first = latest(out)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:3]))  # 4 of 7 lines lost; their images stay
    before = google(gw)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "4 with image files on disk but no record" in proc.stderr
    after = google(gw)
    assert after["batches_created"] == before["batches_created"] and after["uploads"] == before["uploads"]
    recs = latest(out)
    assert sorted(recs) == sorted(first) and sum(bool(r.get("recovered")) for r in recs.values()) == 4
    assert all(recs[i]["sha256"] == first[i]["sha256"] for i in recs)


def test_a_full_quota_is_a_rolling_window(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(**FAST, batch_max_open=1)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"tern {i}" for i in range(8)], max_requests=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = google(gw)
    assert stats["max_open"] == 1 and stats["quota_refusals"] >= 1 and stats["batches_created"] == 4
    assert "batch quota full (429)" in proc.stderr
    assert_all_ok_and_intact(tmp_path / "out", 8)


@pytest.mark.parametrize("fault", ["create_drop", "create_503"])
def test_a_create_with_no_answer_is_found_by_listing_never_sent_twice(
    tmp_path: Path, gateway: StartGateway, fault: str
) -> None:
    gw = gateway(**FAST, batch_faults=((fault, 1.0),))
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"crane {i}" for i in range(6)], max_requests=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "looking for it on the server" in proc.stderr
    stats = google(gw)
    assert stats["batches_created"] == 2 and stats["creates"] == 2 and stats["double_submits"] == 0
    assert_all_ok_and_intact(tmp_path / "out", 6)


def test_no_wait_submits_and_a_later_run_collects(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=0.6)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"ibis {i}" for i in range(5)], max_requests=2)
    out = tmp_path / "out"
    proc = run_cli("run", str(path), "--no-progress", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert "3 batches stay open" in proc.stderr and "collects them" in proc.stderr
    assert len({e["id"] for e in ledger(out) if e["event"] == "created"}) == 3  # the ledger knows them
    # a second --no-wait submits nothing again: the items are in open batches
    proc = run_cli("run", str(path), "--no-progress", "--no-wait")
    assert proc.returncode == 0 and "5 in batches still open" in proc.stderr
    assert google(gw)["batches_created"] == 3
    est = run_cli("estimate", str(path)).stdout
    assert "of the remaining, 5 are in batches still open on the server ($0.335 committed" in est, est
    said = run_cli("report", str(out)).stdout  # 5 items as 2 + 2 + 1
    assert "3 open (5 items," in said and said.count(", 2 items,") == 2 and said.count(", 1 item,") == 1, said
    wait_for(lambda: all(s == "SUCCEEDED" for s in _states(gw)), timeout=30)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert_all_ok_and_intact(out, 5)
    assert google(gw)["batches_created"] == 3 and google(gw)["double_submits"] == 0


def _where(gw: Any) -> list[str]:
    """What `runner cancel` needs to send the key to a gateway that is not Google's."""
    return ["--base-url", gw.base_url, "--key-env", "RUNNER_TEST_KEY"]


def _states(gw: Any) -> list[str]:
    import httpx

    # the mock ends a batch when someone looks: look the way a client does
    for name in gw.stats()["google"]["batches"]:
        httpx.get(f"{gw.base_url}/batches/{name}", headers={"x-goog-api-key": "k"})
    return list(gw.stats()["google"]["batches"].values())


def test_cancel_gives_the_items_back(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"kite {i}" for i in range(4)], max_requests=2)
    out = tmp_path / "out"
    submitted = run_cli("run", str(path), "--no-progress", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    # the cancel command the run suggests works as written (where the batches are, the key's variable)
    said = re.search(r"`(runner cancel [^`]+)` cancels them", submitted.stderr)
    assert said and said.group(1) == shlex.join(["runner", "cancel", str(out), *_where(gw)]), submitted.stderr
    proc = run_cli(*shlex.split(said.group(1))[1:])
    assert proc.returncode == 0 and proc.stderr.count(": cancelled (2 items") == 2, proc.stderr
    assert google(gw)["cancels"] == 2
    # the next run sees them cancelled, says so, and submits the items again
    gw.stop()
    fresh = gateway(**FAST)
    proc = run_cli("run", str(path), "--no-progress", "--base-url", fresh.base_url)
    # the old server is gone: its batches are not known to the new one, and the items go back
    assert proc.returncode == 0, proc.stderr
    assert "no longer knows it" in proc.stderr
    assert_all_ok_and_intact(out, 4)


def test_a_run_after_a_cancel_submits_the_cancelled_items_again(tmp_path: Path, gateway: StartGateway) -> None:
    # the mock keeps its batches in a state dir: the same Google, first slow, then fast
    state = tmp_path / "google"
    slow = gateway(flavor="gemini", batch_latency_s=60, state_dir=state)
    path = batch_spec(tmp_path, slow.base_url, prompts=[f"wren {i}" for i in range(4)], max_requests=2)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    assert run_cli("cancel", str(out), *_where(slow)).returncode == 0
    slow.stop()
    fast = gateway(state_dir=state, **FAST)
    proc = run_cli("run", str(path), "--no-progress", "--base-url", fast.base_url)
    # the user cancelled, then asked for the job again: this run submits the items, not the next one
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("was cancelled before this run: 2 items to submit again") == 2, proc.stderr
    assert_all_ok_and_intact(out, 4)
    assert google(fast)["batches_created"] == 2 and google(fast)["double_submits"] == 0


def test_cancel_leaves_an_ended_batch_to_be_collected(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(**FAST)
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"tern {i}" for i in range(2)], max_requests=2)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    wait_for(lambda: all(s == "SUCCEEDED" for s in _states(gw)), timeout=30)
    proc = run_cli("cancel", str(out), *_where(gw))
    # its results are paid for: cancel leaves it alone, and the next run collects it
    assert proc.returncode == 0 and "already ended SUCCEEDED; nothing to cancel" in proc.stderr, proc.stderr
    assert google(gw)["cancels"] == 0
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert_all_ok_and_intact(out, 2)
    assert google(gw)["batches_created"] == 1


def test_cancel_that_cannot_reach_the_server_exits_1(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=60)
    path = batch_spec(tmp_path, gw.base_url, prompts=["a heron"], max_requests=2)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress", "--no-wait").returncode == 0
    gw.stop()
    proc = run_cli("cancel", str(out), *_where(gw))
    assert proc.returncode == 1 and "could not cancel it" in proc.stderr, proc.stderr


def test_the_budget_counts_a_batch_when_it_is_submitted(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(**FAST)
    # 0.067 a batch-priced 1K Pro image: 3 items a batch is 0.201; 0.25 leaves room for one batch only
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"rook {i}" for i in range(9)], max_cost_usd=0.25)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "budget reached" in proc.stderr
    assert google(gw)["batches_created"] == 1
    assert sum(r["cost_usd"] for r in read_manifest(tmp_path / "out")) <= 0.25


def test_gemini_interactive_reads_google_answers(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", fault_retry_after_s=1.0)
    prompts = ["a pelican", "slow down [fault:429x1]", "no [fault:content_filter]", "blocked [fault:prompt_blocked]"]
    path = write_spec(tmp_path, gw.base_url, api_format="gemini", prompts=prompts)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    recs = {r["prompt"].split(" ")[0]: r for r in latest(tmp_path / "out").values()}
    assert recs["a"]["status"] == "ok" and "extra_images" not in recs["a"]  # the thought image is not an answer
    assert recs["a"]["usage"]["candidatesTokenCount"] > 1000
    assert recs["slow"]["status"] == "ok" and recs["slow"]["retried"] == {"rate_limited": 1}
    assert recs["no"]["error"]["kind"] == "content_filter" and recs["blocked"]["error"]["kind"] == "prompt_blocked"
    log = gw.stats()["requests_log"]
    assert all(e["config_from"] == "generationConfig" for e in log if e["status"] == 200)
    assert google(gw)["key_in_url"] == 0 and any(
        h.startswith("x-goog-api-key") for h in gw.stats()["auth_headers_seen"]
    )
    # a wrong key is Google's 400 API_KEY_INVALID: the run stops, saying what to check
    strict = gateway(flavor="gemini", api_key="the-right-one")
    (tmp_path / "k").mkdir()
    path = write_spec(tmp_path / "k", strict.base_url, api_format="gemini")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "check the key" in proc.stderr


def test_kill_nine_at_any_moment_of_a_batch_job_buys_nothing_twice(tmp_path: Path, gateway: StartGateway) -> None:
    """A kill at random moments of upload, create, poll and download: no key ever in two live batches,
    none paid twice, every item recorded ok once with its image whole."""
    faults = (("create_drop", 0.2), ("missing", 0.1), ("duplicate", 0.1))
    gw = gateway(flavor="gemini", batch_latency_s=0.4, batch_faults=faults, seed=9)
    n = 24
    path = batch_spec(tmp_path, gw.base_url, prompts=[f"egret {i}" for i in range(n)], max_requests=4, max_attempts=8)
    out = tmp_path / "out"
    rng = random.Random(7)
    for _ in range(6):
        proc = start_cli("run", str(path), "--no-progress", "--poll", "0.05")
        target = len(ledger(out)) + rng.randint(1, 6)  # an event of the ledger, not a time
        wait_for(lambda t=target, p=proc: len(ledger(out)) >= t or p.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    proc = start_cli("run", str(path), "--no-progress", "--poll", "0.05")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_all_ok_and_intact(out, n)
    stats = google(gw)
    assert stats["double_submits"] == 0, "an item was submitted while it was in a live batch"
    assert set(stats["paid_keys"].values()) == {1} and len(stats["paid_keys"]) == n
    assert not list(out.glob(".scratch-*"))  # the killed runs' scratch folders are gone too


def test_mock_no_wait_and_a_rerun_on_the_mock(tmp_path: Path) -> None:
    """--mock keeps the mock's batches beside the output: --no-wait, then a later --mock run collects them."""
    path = batch_spec(tmp_path, "http://127.0.0.1:9/v1beta", prompts=["a wren", "a finch", "a lark"], max_requests=2)
    proc = run_cli("run", str(path), "--mock", "--no-progress", "--no-wait")
    assert proc.returncode == 0 and "2 batches stay open" in proc.stderr, proc.stderr
    # the commands it suggests are the ones that reach this mock's batches
    assert f"`runner run {path} --mock` collects them" in proc.stderr, proc.stderr
    assert f"`runner cancel {tmp_path / 'out'} --mock` cancels them" in proc.stderr, proc.stderr
    proc = run_cli("run", str(path), "--mock", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "3 in batches still open" in proc.stderr and not re.search(
        r"submitted \d+ item", proc.stderr
    )  # not bought again
    assert_all_ok_and_intact(tmp_path / "out", 3)
    assert all(r["cost_usd"] == 0.067 for r in read_manifest(tmp_path / "out"))


def test_an_interrupt_while_waiting_leaves_the_batches_open(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=3.0)
    path = batch_spec(tmp_path, gw.base_url, prompts=["a gull", "a tern"], max_requests=1)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress", "--poll", "0.05")
    wait_for(lambda: sum(e["event"] == "created" for e in ledger(out)) == 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "2 batches stay open" in err and "collects them" in err
    proc = start_cli("run", str(path), "--no-progress", "--poll", "0.05")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert_all_ok_and_intact(out, 2)
    assert google(gw)["batches_created"] == 2


def test_the_ledger_folds_events_in_any_order_of_its_files(tmp_path: Path) -> None:
    """Remote ledger parts of two runs can sort out of order (clocks of two machines): a batch
    collected by the second run stays collected even when its events are read before its prepare."""
    from runner.output.ledger import encode_event, read_ledger

    prepare = {"event": "prepare", "id": "b1", "display_name": "runner-x-1", "model": "m", "model_id": "g",
               "items": ["aa", "bb"], "reserved_usd": 0.5, "at": "2026-12-07T10:00:00.000+00:00"}  # fmt: skip
    first, second = tmp_path / "batches.part-2-a.upto-000002.jsonl", tmp_path / "batches.part-1-b.upto-000002.jsonl"
    first.write_bytes(encode_event(prepare) + encode_event({"event": "created", "id": "b1", "name": "batches/1"}))
    second.write_bytes(encode_event({"event": "state", "id": "b1", "state": "SUCCEEDED"})
                       + encode_event({"event": "collected", "id": "b1", "state": "SUCCEEDED"})
                       + encode_event({"event": "collected", "id": "ghost"}))  # fmt: skip
    for order in ([first, second], [second, first]):
        ledger = read_ledger(order)
        assert ledger.open_batches() == [] and ledger.committed_usd() == 0 and ledger.in_batch() == set()
        assert ledger.batches["b1"].name == "batches/1" and ledger.damaged == 1  # the ghost's prepare never came
