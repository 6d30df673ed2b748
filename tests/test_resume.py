"""Resume and crash safety: kills, interrupts, torn lines, bad images, locks, drift, full disks."""

from __future__ import annotations

import hashlib
import json
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.output import LocalSource
from runner.output.files import Jail
from runner.output.manifest import index_name, index_valid, rebuild_index, scan

from .conftest import MockGateway, StartGateway, cli_env, latest, read_manifest, run_cli, start_cli, write_spec


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def read_until(proc: subprocess.Popen[str], text: str, timeout: float = 20.0) -> str:
    """What the process wrote to stderr up to the line holding `text` (an event, not a time)."""
    assert proc.stderr is not None
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), "".join(seen)
    return "".join(seen)


def ok_lines(out: Path) -> int:
    return sum(1 for r in read_manifest(out) if r["status"] == "ok") if (out / "manifest.jsonl").exists() else 0


def assert_all_ok_and_intact(out: Path, n: int) -> None:
    recs = latest(out)
    assert len(recs) == n
    for r in recs.values():
        assert r["status"] == "ok", r
        assert hashlib.sha256((out / r["image_path"]).read_bytes()).hexdigest() == r["sha256"]
    # every item ended ok exactly once: nothing was generated and recorded twice
    counts = Counter(r["item_id"] for r in read_manifest(out) if r["status"] == "ok")
    assert set(counts.values()) == {1}


def test_sigkill_at_random_moments_loses_nothing_paid_for(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.3, latency_jitter_s=0.3)
    n, concurrency, kills = 80, 4, 4
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(n)], concurrency=concurrency)
    out = tmp_path / "out"
    rng = random.Random(5)
    for _ in range(kills):
        proc = start_cli("run", str(path), "--no-progress")
        # Kill once this run has recorded a few items (an event, not a time: a loaded machine is slow),
        # at whatever moment of the next requests that happens to be.
        target = ok_lines(out) + rng.randint(2, 8)
        wait_for(lambda t=target, p=proc: ok_lines(out) >= t or p.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert 0 < ok_lines(out) < n
    final = run_cli("run", str(path), "--no-progress")
    assert final.returncode == 0, final.stderr
    assert_all_ok_and_intact(out, n)
    # paid generations: the items, plus at most the requests in flight at each kill
    assert gw.stats()["generations"] <= n + kills * concurrency


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_finishes_in_flight_requests_records_them_and_exits_130(
    tmp_path: Path, gateway: StartGateway, sig: signal.Signals
) -> None:
    gw = gateway(latency_s=1.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(12)], concurrency=3)
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["in_flight"] == 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun the same command" in err
    out = tmp_path / "out"
    # the three requests in flight at the interrupt were let finish and recorded
    assert ok_lines(out) == gw.stats()["generations"] >= 3
    assert gw.stats()["requests"] < 12
    final = run_cli("run", str(path), "--no-progress")
    assert final.returncode == 0
    assert_all_ok_and_intact(out, 12)


def test_the_grace_period_ends_with_requests_cancelled(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=30.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(4)], concurrency=2)
    proc = start_cli("run", str(path), "--no-progress", "--grace", "0.5")
    wait_for(lambda: gw.stats()["in_flight"] == 2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 20  # far below the 30 s the answers would take: they were cancelled
    assert ok_lines(tmp_path / "out") == 0


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=1.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(4)], concurrency=2)
    first = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["in_flight"] >= 1)
    second = run_cli("run", str(path), "--no-progress")
    assert second.returncode == 3
    assert "in use by another runner" in second.stderr and "Traceback" not in second.stderr
    first.communicate(timeout=30)
    assert first.returncode == 0
    # the lock dies with its process: a run killed while it holds the lock does not leave it stuck
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(8)], concurrency=2)
    third = start_cli("run", str(path), "--no-progress")
    lock = tmp_path / "out" / ".lock"
    wait_for(lambda: lock.read_text().strip() == str(third.pid) and gw.stats()["in_flight"] >= 1)
    third.kill()
    third.communicate(timeout=10)
    assert run_cli("run", str(path), "--no-progress").returncode == 0


def test_torn_last_line_is_set_aside_and_repaired(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    manifest = tmp_path / "out" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    torn = lines[-1][:57]
    torn_prompt = json.loads(lines[-1])["prompt"]
    manifest.write_bytes(b"".join(lines[:-1]) + torn)  # the last record was cut mid-write
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "torn last line" in proc.stderr
    assert (tmp_path / "out" / "manifest.jsonl.torn").read_bytes() == torn + b"\n"
    # the item whose record was torn has its whole image on disk: recorded again, not bought again
    assert mock.stats()["requests"] == 3
    assert [r["prompt"] for r in read_manifest(tmp_path / "out") if r.get("recovered")] == [torn_prompt]
    assert_all_ok_and_intact(tmp_path / "out", 3)


def test_missing_corrupt_and_orphan_images(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c", "d"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    recs = {r["prompt"]: r for r in read_manifest(out)}
    (out / recs["a"]["image_path"]).unlink()
    corrupt = out / recs["b"]["image_path"]
    data = bytearray(corrupt.read_bytes())
    data[-20] ^= 0xFF  # same size, one byte flipped
    corrupt.write_bytes(bytes(data))
    orphan = out / "images" / "zz" / "stray.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"not trusted")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "2 recorded ok but image missing or corrupt (will redo)" in proc.stderr
    assert mock.stats()["requests"] == 6
    assert_all_ok_and_intact_after_redo(out)


def assert_all_ok_and_intact_after_redo(out: Path) -> None:
    for r in latest(out).values():
        assert r["status"] == "ok"
        assert hashlib.sha256((out / r["image_path"]).read_bytes()).hexdigest() == r["sha256"]


def test_spec_drift_is_reported_and_old_records_stay(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    path = write_spec(tmp_path, mock.base_url, prompts=["b", "c", "d"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0
    assert "the spec changed since the last run" in proc.stderr
    assert "2 new items, 1 recorded items are no longer in the spec" in proc.stderr
    assert sorted(r["prompt"] for r in read_manifest(tmp_path / "out")) == ["a", "b", "c", "d"]
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["remaining"]) == (3, 3, 0)


def test_estimate_on_a_half_finished_output_dir(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "rejected [fault:400]"])
    run_cli("run", str(path), "--no-progress")
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "rejected [fault:400]", "c", "d"])
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["remaining"]) == (5, 2, 3)
    assert est["estimated_cost_usd"] == round(3 * 0.134, 6)
    assert est["spent_usd"] == round(2 * 0.134, 6)


def test_an_output_dir_that_cannot_be_written_is_a_clear_error(tmp_path: Path, mock: MockGateway) -> None:
    (tmp_path / "afile").write_text("x")
    path = write_spec(tmp_path, mock.base_url, output_dir="afile/out")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "cannot write to output dir" in proc.stderr and "Traceback" not in proc.stderr
    assert mock.stats()["requests"] == 0


def test_a_full_disk_stops_the_run_and_damages_nothing(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(30)], concurrency=1)

    def small_disk() -> None:  # files cannot grow past 6 kB: the manifest fills up as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6_000, 6_000))

    # Coverage cannot save its data under this limit either: this one process goes unmeasured.
    env = {k: v for k, v in cli_env().items() if not k.startswith("COVERAGE_PROCESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(path), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=60, preexec_fn=small_disk, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "cannot write to output dir" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "out"
    whole = (out / "manifest.jsonl").read_bytes().split(b"\n")[:-1]  # the last write may be cut off
    assert len(whole) >= 3, "items written before the disk filled"
    for line in whole:
        r = json.loads(line)
        assert hashlib.sha256((out / r["image_path"]).read_bytes()).hexdigest() == r["sha256"]
    # with space again, a rerun repairs the manifest and finishes the job
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert_all_ok_and_intact(out, 30)


def test_the_resume_index_agrees_with_the_manifest_and_is_rebuilt_when_stale(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c", "rejected [fault:400]"])
    run_cli("run", str(path), "--no-progress")
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    assert index_valid(manifest)
    from_index = scan(out, LocalSource(out).intact)
    (out / index_name(manifest.name)).unlink()
    from_json = scan(out, LocalSource(out).intact)
    assert (from_index.done, from_index.permanent, from_index.spent_usd) == (
        from_json.done, from_json.permanent, from_json.spent_usd,
    ) and len(from_index.done) == 3  # fmt: skip
    # a stale index (here: missing its last line) is never trusted; the next run rebuilds it
    rebuild_index(Jail(out), manifest.name, durable=False)
    idx = out / index_name(manifest.name)
    idx.write_bytes(b"".join(idx.read_bytes().splitlines(keepends=True)[:-1]))
    assert not index_valid(manifest)
    assert run_cli("run", str(path), "--no-progress").returncode == 1  # the 400 is still failed
    assert index_valid(manifest) and mock.stats()["requests"] == 4


def test_an_interrupt_cuts_a_backoff_short_and_records_the_failure(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(fault_retry_after_s=60)  # the server asks for a 60 s wait
    path = write_spec(tmp_path, gw.base_url, prompts=["busy [fault:429]"], max_attempts=5)
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["by_status"].get("429") == 1)  # answered: the run is in its backoff
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 30  # far below the 60 s the server asked for: the wait was cut short
    (rec,) = read_manifest(tmp_path / "out")
    assert rec["status"] == "failed" and rec["error"]["kind"] == "rate_limited" and rec["attempts"] == 1
    assert gw.stats()["requests"] == 1


def test_a_second_interrupt_cancels_requests_but_keeps_what_was_received(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=1.5)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"slow {i}" for i in range(4)], concurrency=4, timeout_s=60)
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["in_flight"] == 4)
    proc.send_signal(signal.SIGINT)
    said = read_until(proc, "interrupted: no new items start")  # the first interrupt was taken
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    err = said + err
    assert proc.returncode == 130, err
    assert "second interrupt: cancelling the requests in flight" in err
    # the cancelled requests left no records; the next run sends them and finishes
    assert ok_lines(tmp_path / "out") == 0
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert_all_ok_and_intact(tmp_path / "out", 4)


def test_resume_and_report_agree_on_which_line_counts(tmp_path: Path, gateway: StartGateway) -> None:
    """One rule (record.supersedes) for resume and report: an ok item whose image went bad, was sent
    again and failed is failed for both; an ok whose image is intact stands against a failure read
    after it from another manifest."""
    polite, refusing = gateway(), gateway(fault_rates=(("content_filter", 1.0),))
    path = write_spec(tmp_path, polite.base_url, prompts=["a cat", "a dog"])
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    cat = next(r for r in latest(out).values() if r["prompt"] == "a cat")
    image = out / cat["image_path"]
    image.write_bytes(b"\x89PNG" + image.read_bytes()[4:-1])  # corrupt, same name: the redo is due
    proc = run_cli("run", str(path), "--no-progress", "--base-url", refusing.base_url)
    assert proc.returncode == 1 and "1 recorded ok but image missing or corrupt" in proc.stderr
    assert refusing.stats()["requests"] == 1  # the dog was not sent again

    def both() -> tuple[dict[str, object], dict[str, object]]:
        report = json.loads(run_cli("report", str(out), "--json").stdout)
        estimate = json.loads(run_cli("estimate", str(path), "--json").stdout)
        return report, estimate

    report, estimate = both()
    assert (report["ok"], report["failed"], report["failures_by_kind"]) == (1, 1, {"content_filter": 1})
    assert (estimate["done"], estimate["failed_permanently"]) == (1, 1)
    assert "nothing to run: the rest failed permanently" in run_cli("run", str(path), "--no-progress").stderr
    # A failure of the dog read after its ok, from another manifest (shards): its image is intact, the ok stands.
    dog = next(r for r in latest(out).values() if r["prompt"] == "a dog")
    late = {**dog, "status": "failed", "error": {"kind": "content_filter", "status": 200, "message": "x"}}
    for key in ("image_path", "mime", "bytes", "sha256", "mtime_ns", "width", "height"):
        late.pop(key)
    (out / "manifest.shard-0-of-1.jsonl").write_text(json.dumps(late) + "\n")
    report, estimate = both()
    assert (report["ok"], report["failed"]) == (1, 1) and (estimate["done"], estimate["failed_permanently"]) == (1, 1)
    # ...but once the dog's image is gone too, the failure counts for both
    (out / dog["image_path"]).unlink()
    report, estimate = both()
    assert (report["ok"], report["failed"]) == (0, 2) and (estimate["done"], estimate["failed_permanently"]) == (0, 2)
