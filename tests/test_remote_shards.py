"""Many machines, one dataset on S3 (issue 24), against a real S3-compatible server (moto) on loopback:
leases keep two runners of one shard, or shards of two N, from both paying; manifest parts are
committed in groups and merged, so a start reads O(shards) objects; kills anywhere lose nothing and
count nothing twice; the report shows every shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.errors import OutputLocked
from runner.output import lease as lease_mod
from runner.output import remote as remote_mod
from runner.output.parts import group, merged_name, part_name, select
from runner.output.remote import RemoteStore
from runner.report import report

from .conftest import BUCKET, MockGateway, S3Requests, StartGateway, cli_env, manifest_line, run_cli, write_spec

pytest.importorskip("s3fs", reason="the s3 extra is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")


def names(s3: Any, prefix: str) -> list[str]:
    root = f"{BUCKET}/{prefix}"
    return sorted(p[len(root) + 1 :] for p in s3.find(root))


def manifests(s3: Any, prefix: str) -> list[str]:
    return [n for n in names(s3, prefix) if n.startswith("manifest") and n.endswith(".jsonl")]


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll until `what` holds (an event we cannot be told of), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.03)


def start_runner(*args: str, patch: str = "") -> subprocess.Popen[str]:
    """`runner ARGS` in a subprocess (one a test can kill -9), with module constants patched first."""
    code = f"import sys, runner.output.remote as remote\n{patch}\nfrom runner.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )


def refused(url: str, shard: tuple[int, int] | None, **kwargs: Any) -> str:
    """Open a store that must be refused; the message."""
    store = RemoteStore(url, shard, **kwargs)
    try:
        with pytest.raises(OutputLocked) as e:
            store.open()
    finally:
        store.close()
    return str(e.value)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# -- 1. leases ------------------------------------------------------------------------------------------------
def test_two_runners_of_one_shard_on_s3_one_refuses(tmp_path: Path, gateway: StartGateway, s3: Any) -> None:
    gw = gateway(latency_s=1.0)
    url = f"s3://{BUCKET}/one"
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(24)], output_dir=url, concurrency=1)
    first = start_runner("run", str(path), "--no-progress", "--shard", "1/2")
    wait_for(lambda: gw.stats()["in_flight"] > 0)  # it holds the lease: it is sending
    second = run_cli("run", str(path), "--no-progress", "--shard", "1/2")
    assert second.returncode == 3, second.stderr
    assert "shard 1/2 is being run by another runner" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)  # a Slurm time limit: it records what is in flight and ends
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    paid = gw.stats()["generations"]
    # it released its lease when it ended: the same shard goes on at once, and buys each item once
    assert run_cli("run", str(path), "--no-progress", "--shard", "1/2", "--concurrency", "16").returncode == 0
    shard_items = json.loads(run_cli("estimate", str(path), "--json", "--shard", "1/2").stdout)["items"]
    assert 0 < paid < shard_items and gw.stats()["generations"] == shard_items
    assert set(gw.stats()["by_prompt"].values()) == {1}
    lease = json.loads(s3.cat_file(f"{BUCKET}/one/.leases/shard-1-of-2.000002.json"))
    assert lease["released"] is True
    assert names(s3, "one/.leases") == ["shard-1-of-2.000002.json"]  # one lease object per shard


def test_shards_of_two_n_at_once_on_s3_one_refuses(tmp_path: Path, gateway: StartGateway, s3: Any) -> None:
    gw = gateway(latency_s=1.0)
    url = f"s3://{BUCKET}/two"
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(12)], output_dir=url, concurrency=1)
    first = start_runner("run", str(path), "--no-progress", "--shard", "0/2")
    wait_for(lambda: gw.stats()["in_flight"] > 0)
    other_n = run_cli("run", str(path), "--no-progress", "--shard", "0/4")
    assert other_n.returncode == 3 and "in use by shards of --shard K/2: shard 0/2" in other_n.stderr
    unsharded = run_cli("run", str(path), "--no-progress")
    assert unsharded.returncode == 3 and "in use by --shard runs" in unsharded.stderr
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    # once nothing of N=2 runs, another N may go on (then an unsharded run): what 0/2 bought is not bought again
    assert run_cli("run", str(path), "--no-progress", "--shard", "0/4", "--concurrency", "16").returncode == 0
    assert run_cli("run", str(path), "--no-progress", "--concurrency", "16").returncode == 0
    assert gw.stats()["generations"] == 12 and set(gw.stats()["by_prompt"].values()) == {1}


def test_runners_starting_at_the_same_moment_never_both_run(s3: Any) -> None:
    """Both create their lease before either looks: each sees the other and steps back; whoever comes
    back first runs, the other then finds it running and refuses."""
    url = f"s3://{BUCKET}/tie"
    clock = Clock()
    b = RemoteStore(url, (0, 4), clock=clock)
    b_lease = b.lease
    b_lease.started = b_lease.renewed = clock()
    b.lease.leases.create(b.lease.leases.path(b.lease.key, 1), b_lease._body(), True)  # B created, not yet looked

    def a_backs_off(seconds: float) -> None:
        assert 0 < seconds <= 2.0
        b.lease.gen = 1
        b.lease._drop()  # B saw A too and stepped back; A comes back first
        b.lease.gen = 0

    a = RemoteStore(url, (0, 2), clock=clock, sleep=a_backs_off)
    a.open()  # A looked, saw B, backed off, came back, ran
    assert a.lease.gen == 1
    # B comes back: A runs, B refuses
    assert "in use by shards of --shard K/2" in refused(url, (0, 4), clock=clock, sleep=lambda s: None)
    a.close()
    b.close()


def test_two_runners_creating_the_same_generation_one_gets_412(s3: Any) -> None:
    url = f"s3://{BUCKET}/race"
    a, b = RemoteStore(url, (1, 4)), RemoteStore(url, (1, 4))
    create = b.lease.leases.create

    def a_first(path: str, data: bytes, atomic: bool) -> bool:
        if path.endswith("/shard-1-of-4.000001.json") and not a.lease.gen:
            a.open()  # A looked when B did, and creates the same generation a moment before B
        return create(path, data, atomic)

    b.lease.leases.create = a_first  # type: ignore[method-assign]
    try:
        with pytest.raises(OutputLocked, match="shard 1/4 is being run by another runner"):
            b.open()  # B's create gets 412; B looks again and finds A's lease live
        assert a.lease.gen == 1 and b.lease.gen == 0
    finally:
        b.close()
        a.close()


def test_a_server_that_ignores_the_condition_is_said_loudly(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod.Leases, "create", lambda self, path, data, atomic: True)
    store = RemoteStore(f"s3://{BUCKET}/ignores")
    try:
        store.open()
        assert any("ignores If-None-Match" in w and "NOT kept apart" in w for w in store.warnings)
    finally:
        store.close()


def test_a_lease_lapses_unless_renewed_and_a_stalled_holder_stops(s3: Any) -> None:
    url = f"s3://{BUCKET}/lapse"
    clock = Clock()
    ttl, renew = lease_mod.TTL_S, lease_mod.RENEW_S
    a = RemoteStore(url, (3, 8), clock=clock)
    a.open()
    clock.now += renew + 1
    assert a.upkeep() is None  # renewed
    clock.now += ttl - 2  # past the first expiry, within the renewed one
    message = refused(url, (3, 8), clock=clock)
    assert "shard 3/8 is being run by another runner" in message and "lapses at" in message
    clock.now += ttl  # A stalled: no renewal; its lease lapses and B takes over
    b = RemoteStore(url, (3, 8), clock=clock)
    b.open()
    assert b.lease.gen == 2
    reason = a.upkeep()
    assert reason is not None and "lost the lease of shard 3/8" in reason
    a.close()  # a lost lease is not released: B's stays
    refused(url, (3, 8), clock=clock)
    b.close()
    assert names(s3, "lapse/.leases") == ["shard-3-of-8.000002.json"]


def test_the_run_renews_its_lease_while_it_lives(tmp_path: Path, gateway: StartGateway, s3: Any) -> None:
    gw = gateway(latency_s=0.5)
    url = f"s3://{BUCKET}/renew"
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(4)], output_dir=url, concurrency=1)
    key = f"{BUCKET}/renew/.leases/all.000001.json"
    renewals: list[float] = []

    def renewed_twice() -> bool:
        if s3.exists(key):
            body = json.loads(s3.cat_file(key))
            if body["renewed"] not in renewals:
                renewals.append(body["renewed"])
        return len(renewals) >= 3

    patch = "remote.RemoteStore.upkeep_s = 0.02; import runner.output.lease as lease; lease.RENEW_S = 0.05"
    proc = start_runner("run", str(path), "--no-progress", patch=patch)
    wait_for(renewed_twice)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_a_store_without_atomic_create_says_so_loudly() -> None:
    pytest.importorskip("fsspec")
    store = RemoteStore(f"memory://runner-noatomic-{os.getpid()}/out")
    store.open()
    try:
        assert any("cannot create an object only if it is absent" in w for w in store.warnings)
        assert any("NOT kept apart" in w for w in store.warnings)
    finally:
        store.close()


# -- 2. group commit, merges, reads ----------------------------------------------------------------------------
def test_parts_a_reader_reads_each_line_once_at_every_moment_of_a_merge() -> None:
    run = "manifest.shard-1-of-2.part-20261207T100000Z-0a1b2c3d"
    parts = [part_name(run, s) for s in (1, 2, 3)]
    assert select(parts) == parts
    merged = merged_name(run, 3)
    assert select([*parts, merged]) == [merged]  # merged written, parts not yet deleted
    assert select([parts[2], merged]) == [merged]  # some deleted
    later = part_name(run, 4)  # a part written after the merge (a runner that stalled past its lease)
    assert select([merged, later]) == [later, merged] and group([merged, later])[0][run].needs_merge()
    assert select([merged, merged_name(run, 4), later, "manifest.jsonl"]) == ["manifest.jsonl", merged_name(run, 4)]
    ledger = "batches.part-20261207T100000Z-0a1b2c3d"
    assert select([part_name(ledger, 1), merged_name(ledger, 2), part_name(ledger, 2)]) == [merged_name(ledger, 2)]


def test_a_kill_in_the_middle_of_a_group_commit_loses_nothing_and_pays_nothing_twice(
    tmp_path: Path, gateway: StartGateway, s3: Any
) -> None:
    gw = gateway(latency_s=0.1)
    url = f"s3://{BUCKET}/kill"
    n = 40
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(n)], output_dir=url, concurrency=2)
    proc = start_runner("run", str(path), "--no-progress", patch="remote.COMMIT_S = 0.3")

    def lines_committed() -> int:
        return sum(len(s3.cat_file(f"{BUCKET}/kill/{m}").splitlines()) for m in manifests(s3, "kill"))

    def images() -> int:
        return sum(1 for x in names(s3, "kill") if x.startswith("images/"))

    def between_commits() -> bool:
        """Frozen where some lines are committed in parts and others wait in the group, their images saved."""
        proc.send_signal(signal.SIGSTOP)
        committed = lines_committed()
        if len(manifests(s3, "kill")) >= 2 and committed < images() - 1:
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    wait_for(between_commits)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_parts = manifests(s3, "kill")
    # (a part or an image the server was still taking in at SIGSTOP is counted now)
    committed, saved, paid_before = lines_committed(), images(), gw.stats()["generations"]
    assert 0 < committed <= saved < n

    rerun = run_cli("run", str(path), "--no-progress")  # the same machine: its dead holder's lease is no obstacle
    assert rerun.returncode == 0, rerun.stderr
    if saved > committed:  # all but always: lines waited in the group when the kill came
        assert f"{saved - committed} with image files on disk but no record" in rerun.stderr
    # every saved image is recorded from the store, not bought again (answers in flight at the kill
    # were never saved: those, and only those, are bought again)
    assert gw.stats()["generations"] - paid_before == n - saved
    rep = json.loads(run_cli("report", url, "--json", "--no-quality").stdout)
    assert (rep["items"], rep["ok"], rep["failed"]) == (n, n, 0)
    assert rep["recovered"] == saved - committed and rep["generated_more_than_once"] == 0
    assert rep["requests"] == committed + (n - saved) and rep["lines"] == n  # no line counted twice
    left = manifests(s3, "kill")
    killed_run = killed_parts[0].rsplit("-", 1)[0]
    assert len(killed_parts) >= 2 and [m for m in left if m.startswith(killed_run)] == [
        merged_name(killed_run, len(killed_parts))
    ]  # the killed run's parts, merged into one by the next start
    assert len(left) <= 2


def test_a_merge_cut_short_by_a_kill_reads_right_and_is_finished_by_the_next_start(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{BUCKET}/merge"
    clock = Clock()
    store = RemoteStore(url, None, clock=clock)
    store.open()
    local = tmp_path / "lines"
    local.mkdir()
    records = [manifest_line(local, i, at=f"2026-12-07T10:00:{i:02d}.000+00:00", cost=0.1) for i in range(6)]
    for rec in records:
        store.save_image(rec["image_path"], (local / rec["image_path"]).read_bytes())
    for i in range(0, 6, 2):  # three parts of two lines
        store.append(records[i : i + 2], [json.dumps(r).encode() + b"\n" for r in records[i : i + 2]])
        with store._lock:
            store._commit()
    assert len(manifests(s3, "merge")) == 3

    class Killed(BaseException):
        pass

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with monkeypatch.context() as patched, pytest.raises(Killed):
        patched.setattr(store.fs, "rm", killed)  # the merged object is written; the kill comes before the deletes
        store._manifest.merge()
    assert len(manifests(s3, "merge")) == 4  # merged + its three parts

    rep = report(url, images=False)
    assert (rep["items"], rep["ok"], rep["lines"], rep["requests"]) == (6, 6, 6, 6)
    assert rep["cost_usd"] == pytest.approx(0.6)
    refused(url, None, clock=clock)  # the killed runner's lease is still live (on another machine, as it were)
    clock.now += lease_mod.TTL_S + 1
    nxt = RemoteStore(url, None, clock=clock)
    nxt.open()
    assert nxt.merged_runs == 1 and manifests(s3, "merge") == [merged_name(store._manifest.run, 3)]
    assert len(nxt.scan(False).done) == 6
    nxt.close()
    store.lease.gen = 0  # the killed runner never comes back to release anything
    store.close()


def test_a_finished_sharded_job_leaves_few_objects_and_a_no_op_start_reads_only_those(
    tmp_path: Path, gateway: StartGateway, s3: Any, s3_requests: S3Requests, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_mod, "COMMIT_S", 0.0)  # a part per commit of the sink: many parts to merge
    mock = gateway(latency_s=0.1)  # one item at a time, each in a commit of its own
    url = f"s3://{BUCKET}/noop"
    n = 10
    path = write_spec(tmp_path, mock.base_url, prompts=[f"p{i}" for i in range(n)], output_dir=url, concurrency=1)
    for k in range(2):
        proc = run_cli("run", str(path), "--no-progress", "--shard", f"{k}/2")
        assert proc.returncode == 0, proc.stderr
    objects = manifests(s3, "noop")
    assert len(objects) == 2 and all(".upto-" in m for m in objects)  # one per shard run
    assert mock.stats()["requests"] == n

    s3_requests.seen.clear()
    proc = run_cli("run", str(path), "--no-progress", "--shard", "0/2")
    assert proc.returncode == 0 and "nothing to do" in proc.stderr
    assert mock.stats()["requests"] == n
    assert sorted(p.rsplit("/", 1)[-1] for p in s3_requests.gets("/manifest")) == objects
    # the manifests, spec.json and its own lease (is it still held?): O(shards), whatever the items;
    # image sizes come from listings, never reads
    reads = sorted(p.split("/noop/", 1)[1] for p in s3_requests.gets())
    assert reads == [".leases/shard-0-of-2.000001.json", *objects, "spec.json"]


# -- 3. quality cache in the bucket, --no-quality ---------------------------------------------------------------
def test_a_second_report_on_s3_reuses_its_cache_and_no_quality_reads_no_image(
    tmp_path: Path, mock: MockGateway, s3: Any, s3_requests: S3Requests
) -> None:
    pytest.importorskip("PIL", reason="near duplicates need Pillow")
    url = f"s3://{BUCKET}/q"
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"], output_dir=url)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    first = json.loads(run_cli("report", url, "--json").stdout)
    assert first["hashes"]["hashed"] == 3 and ".quality-cache.tsv" in names(s3, "q")
    s3_requests.seen.clear()
    second = json.loads(run_cli("report", url, "--json").stdout)
    assert (second["hashes"]["hashed"], second["hashes"]["from_cache"]) == (0, 3)
    assert not s3_requests.gets("/images/")
    s3_requests.seen.clear()
    proc = run_cli("report", url, "--no-quality")
    assert proc.returncode == 0 and "--no-quality" in proc.stdout
    assert not s3_requests.gets("/images/") and not s3_requests.gets("quality-cache")


# -- 4. the report's shards --------------------------------------------------------------------------------------
def test_the_report_shows_every_shard_and_the_jobs_total(tmp_path: Path, mock: MockGateway, s3: Any) -> None:
    url = f"s3://{BUCKET}/table"
    n = 12
    path = write_spec(tmp_path, mock.base_url, prompts=[f"p{i}" for i in range(n)], output_dir=url)
    assert run_cli("run", str(path), "--no-progress", "--shard", "0/3").returncode == 0
    expected = [
        json.loads(run_cli("estimate", str(path), "--json", "--shard", f"{k}/3").stdout)["items"] for k in range(3)
    ]
    running = RemoteStore(url, (2, 3))
    running.open()  # shard 2/3 is running now (it holds its lease)
    try:
        rep = json.loads(run_cli("report", url, "--json", "--no-quality").stdout)
        text = run_cli("report", url, "--no-quality").stdout
    finally:
        running.close()
    assert rep["spec_items"] == n and rep["shards"]["count"] == 3 and rep["shards"]["running"] == 1
    rows = rep["shards"]["rows"]
    assert [r["shard"] for r in rows] == ["0/3", "1/3", "2/3"]
    assert [r["expected"] for r in rows] == expected
    assert (rows[0]["ok"], rows[0]["items"], rows[0]["running"]) == (expected[0], expected[0], False)
    assert rows[0]["cost_usd"] > 0 and rows[0]["last_activity"] is not None
    assert (rows[1]["ok"], rows[1]["running"], rows[1]["last_activity"]) == (0, False, None)
    assert rows[2]["running"] is True and "pid" in rows[2]["holder"]
    assert "shards: 3 (--shard K/3), 1 running now" in text and f"of the {n} in the spec not yet run" in text
    assert "paid twice" not in text


def test_the_report_counts_items_generated_more_than_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    one = [manifest_line(out, i, run="r1") for i in range(3)]
    two = [manifest_line(out, 0, run="r2"), manifest_line(out, 1, run="r2", attempts=0)]  # the 2nd: recovered, unpaid
    (out / "manifest.shard-0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one))
    (out / "manifest.shard-1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two + one[2:]))
    rep = report(out, images=False)
    assert rep["generated_more_than_once"] == 1  # item 0: two paid ok lines; item 2's second line is the same line
    assert rep["shards"] is not None and rep["shards"]["count"] == 2


def test_the_batch_ledgers_parts_are_merged_like_the_manifests(s3: Any) -> None:
    """The ledger (output/ledger.py) writes an object per event; the run's end merges them, and a
    reader folds each event once."""
    from runner.output import open_view

    url = f"s3://{BUCKET}/ledger"
    items = ["0123456789abcdef0123", "fedcba9876543210fedc"]
    store = RemoteStore(url, (1, 2))
    store.open()
    store.append_ledger({"event": "prepare", "id": "b1", "display_name": "runner-b1", "model": "nanobanana",
                         "model_id": "gemini-2.5-flash-image", "items": items, "reserved_usd": 0.04, "at": "x"})  # fmt: skip
    store.append_ledger({"event": "created", "id": "b1", "name": "batches/123"})
    store.append_ledger({"event": "state", "id": "b1", "state": "JOB_STATE_RUNNING", "stats": {}})
    assert sum(n.startswith("batches.shard-1-of-2.part-") for n in names(s3, "ledger")) == 3
    store.close()
    ledgers = [n for n in names(s3, "ledger") if n.startswith("batches")]
    assert len(ledgers) == 1 and ".upto-000003." in ledgers[0]
    with open_view(url) as view:
        ledger = view.ledger()
        assert [b.name for b in ledger.open_batches()] == ["batches/123"] and ledger.damaged == 0
        assert view.scan().in_batch == {int(i, 16) for i in items}


def test_a_holder_that_cannot_renew_stops_while_its_lease_still_holds(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{BUCKET}/unreachable"
    clock = Clock()
    ttl, renew = lease_mod.TTL_S, lease_mod.RENEW_S
    a = RemoteStore(url, (1, 2), clock=clock)
    a.open()

    def unreachable() -> dict[str, list[int]]:
        raise OSError("the bucket cannot be reached")

    monkeypatch.setattr(a.lease.leases, "generations", unreachable)
    clock.now += renew + 1
    assert a.upkeep() is None  # a moment without the store: tried again next time
    clock.now = a.lease.expires - 2 * renew  # two renewals from the end: stop now, before another may take over
    reason = a.upkeep()
    assert reason is not None and "could not renew the lease" in reason and clock.now < a.lease.expires
    assert ttl > 2 * renew
    monkeypatch.undo()
    a.close()
