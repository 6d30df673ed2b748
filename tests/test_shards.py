"""Many machines: --shard K/N splits one job over one shared output dir with no overlap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .conftest import StartGateway, read_manifest, run_cli, start_cli, write_spec


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
