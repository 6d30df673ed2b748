"""Many machines: --shard K/N splits one job over one shared output dir with no overlap."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from .conftest import MockGateway, StartGateway, read_manifest, run_cli, start_cli, write_spec


def test_shards_split_the_job_and_everything_reads_all_manifests(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.05)
    n = 30
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(n)], concurrency=3)
    procs = [start_cli("run", str(path), "--no-progress", "--shard", f"{k}/3") for k in range(3)]
    for p in procs:  # three shards at once on one output dir: each locks only its own manifest
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    out = tmp_path / "out"
    assert sorted(f.name for f in out.glob("manifest*.jsonl")) == [f"manifest.shard-{k}-of-3.jsonl" for k in range(3)]
    sizes = [len((out / f"manifest.shard-{k}-of-3.jsonl").read_text().splitlines()) for k in range(3)]
    assert sum(sizes) == n and min(sizes) > 0
    assert set(Counter(r["item_id"] for r in read_manifest(out)).values()) == {1}
    assert gw.stats()["generations"] == n
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert (report["ok"], report["failed"]) == (n, 0)
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["remaining"]) == (n, n, 0)
    # a rerun, sharded or not, finds everything done and sends nothing
    assert run_cli("run", str(path), "--no-progress", "--shard", "1/3").returncode == 0
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert gw.stats()["requests"] == n


def test_shard_estimates_add_up_and_bad_shards_are_usage_errors(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=[f"p{i}" for i in range(50)], requests_per_minute=60)
    ests = [json.loads(run_cli("estimate", str(path), "--json", "--shard", f"{k}/4").stdout) for k in range(4)]
    assert sum(e["items"] for e in ests) == 50
    assert all(e["requests_per_minute"] == 15 for e in ests)
    for bad in ("4/4", "x", "1/0"):
        proc = run_cli("estimate", str(path), "--shard", bad)
        assert proc.returncode == 2 and "--shard" in proc.stderr


def test_an_ok_in_one_manifest_is_not_undone_by_a_failure_in_another(tmp_path: Path, mock: MockGateway) -> None:
    # "flaky" fails in shard 0's manifest, then succeeds in a later unsharded run, whose
    # manifest.jsonl sorts before the shard file: the ok must still count.
    path = write_spec(tmp_path, mock.base_url, prompts=["flaky [fault:503x1]"], max_attempts=1)
    only_shard = "0/1"
    assert run_cli("run", str(path), "--no-progress", "--shard", only_shard).returncode == 1
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    before = mock.stats()["requests"]
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert mock.stats()["requests"] == before == 2
    report = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert (report["ok"], report["failed"]) == (1, 0)


def test_an_unsharded_run_is_refused_while_shards_run(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=1.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(6)], concurrency=2)
    shard = start_cli("run", str(path), "--no-progress", "--shard", "0/2")
    deadline = time.monotonic() + 20
    while gw.stats()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "in use by another runner (or --shard runs)" in proc.stderr
    shards = json.loads(run_cli("report", str(tmp_path / "out"), "--json", "--no-quality").stdout)["shards"]
    assert [r["running"] for r in shards["rows"]] == [True, False]  # its lock, as /proc/locks shows it
    other = run_cli("run", str(path), "--no-progress", "--shard", "1/2")
    assert other.returncode == 0, other.stderr
    shard.communicate(timeout=30)
    assert shard.returncode == 0


def test_a_shard_counts_its_own_orphans_says_its_budget_and_the_report_shows_every_shard(
    tmp_path: Path, mock: MockGateway
) -> None:
    from runner.report.text import format_quality
    from runner.spec import load_spec
    from runner.spec.items import iter_items

    from .conftest import png

    path = write_spec(tmp_path, mock.base_url, prompts=[f"p{i}" for i in range(12)], max_cost_usd=10.0)
    ids = [item.item_id for item in iter_items(load_spec(path))]
    mine = [i for i in ids if int(i, 16) % 2 == 0]
    theirs = [i for i in ids if int(i, 16) % 2 == 1]
    out = tmp_path / "out"
    for iid in mine[:2] + theirs[:3]:  # images saved, lines lost (a kill), in both shards
        (out / "images" / iid[:2]).mkdir(parents=True, exist_ok=True)
        (out / "images" / iid[:2] / f"{iid}.png").write_bytes(png(64, 64))
    proc = run_cli("run", str(path), "--no-progress", "--shard", "0/2")
    assert proc.returncode == 0, proc.stderr
    assert "2 with image files on disk but no record" in proc.stderr  # its own two, not the other shard's
    assert "budget per shard: this one may spend $5.00 (1/2 of the $10.00 left of max_cost_usd 10" in proc.stderr
    assert mock.stats()["generations"] == len(mine) - 2

    report = json.loads(run_cli("report", str(out), "--json", "--no-quality").stdout)
    assert report["spec_items"] == 12 and report["shards"]["count"] == 2
    rows = report["shards"]["rows"]
    assert [(r["shard"], r["expected"], r["ok"]) for r in rows] == [
        ("0/2", len(mine), len(mine)),
        ("1/2", len(theirs), 0),
    ]
    assert [r["running"] for r in rows] == [False, False]
    text = run_cli("report", str(out), "--no-quality").stdout
    assert (
        f"{len(theirs)} of the 12 in the spec not yet run" in text and "shards: 2 (--shard K/2), 0 running now" in text
    )
    # the size check blames no one in particular (this run used a gateway)
    assert "mock" not in format_quality({"size_off": ["x"]})  # type: ignore[typeddict-item]
