"""Remote output dirs (s3://) against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import BUCKET, MockGateway, StartGateway, run_cli, write_spec

pytest.importorskip("s3fs", reason="the s3 extra is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")


def test_a_run_into_s3_resumes_reports_and_exports(tmp_path: Path, mock: MockGateway, s3: Any) -> None:
    url = f"s3://{BUCKET}/jobs/t"
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c", "rejected [fault:400]"], output_dir=url)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.find(f"{BUCKET}/jobs/t"))
    parts = [n for n in names if n.startswith("manifest.part-")]
    assert parts and "spec.json" in names and sum(n.endswith(".png") for n in names) == 3
    records = [json.loads(line) for p in parts for line in s3.cat_file(f"{BUCKET}/jobs/t/{p}").splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(records) == 4 and len(ok) == 3
    for r in ok:
        assert hashlib.sha256(s3.cat_file(f"{BUCKET}/jobs/t/{r['image_path']}")).hexdigest() == r["sha256"]
    assert not list(tmp_path.glob("out*")), "nothing is written locally"

    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["remaining"]) == (4, 3, 1)
    rep = json.loads(run_cli("report", url, "--json").stdout)
    assert (rep["ok"], rep["failed"]) == (3, 1)

    # a lost image is redone; everything else is skipped
    s3.rm_file(f"{BUCKET}/jobs/t/{ok[0]['image_path']}")
    before = mock.stats()["requests"]
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1 and "1 recorded ok but image missing" in proc.stderr  # the 400 stays failed
    assert mock.stats()["requests"] == before + 1

    assert run_cli("export", url).returncode == 0
    meta = [json.loads(x) for x in s3.cat_file(f"{BUCKET}/jobs/t/metadata.jsonl").splitlines()]
    assert sorted(m["prompt"] for m in meta) == ["a", "b", "c"]
    # WebDataset shards stream from the bucket and go back into it, with the card
    assert run_cli("export", url, "--format", "webdataset").returncode == 0
    names = {p.rsplit("/", 1)[-1] for p in s3.find(f"{BUCKET}/jobs/t/webdataset")}
    assert names == {"shard-000000.tar", "README.md"}
    with tarfile.open(fileobj=io.BytesIO(s3.cat_file(f"{BUCKET}/jobs/t/webdataset/shard-000000.tar"))) as tar:
        assert sum(n.endswith(".json") for n in tar.getnames()) == 3


def test_a_remote_url_without_the_extra_is_a_clear_error(tmp_path: Path) -> None:
    path = write_spec(tmp_path, output_dir="nosuchproto://bucket/x")
    proc = run_cli("estimate", str(path))
    assert proc.returncode == 2 and "pip install -e '.[s3]'" in proc.stderr and "Traceback" not in proc.stderr
    assert os.environ.get("AWS_ENDPOINT_URL") is None


def test_verify_on_s3_reads_every_image(tmp_path: Path, mock: MockGateway, s3: Any) -> None:
    """An image whose bytes changed but not its size passes the listing; --verify hashes it and redoes it."""
    url = f"s3://{BUCKET}/jobs/v"
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"], output_dir=url)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    parts = [p for p in s3.find(f"{BUCKET}/jobs/v") if p.rsplit("/", 1)[-1].startswith("manifest.part-")]
    rec = json.loads(s3.cat_file(parts[0]).splitlines()[0])
    key = f"{BUCKET}/jobs/v/{rec['image_path']}"
    data = s3.cat_file(key)
    s3.pipe_file(key, data[:-5] + b"XXXXX")  # same size, other bytes
    before = mock.stats()["requests"]
    assert "nothing to do" in run_cli("run", str(path), "--no-progress").stderr  # sizes match: trusted
    proc = run_cli("run", str(path), "--no-progress", "--verify")
    assert proc.returncode == 0 and "1 recorded ok but image missing or corrupt" in proc.stderr
    assert mock.stats()["requests"] == before + 1
    assert hashlib.sha256(s3.cat_file(key)).hexdigest() != hashlib.sha256(data[:-5] + b"XXXXX").hexdigest()


def test_a_batch_edit_chain_into_s3_resumes_after_no_wait_and_buys_nothing_twice(
    tmp_path: Path, gateway: StartGateway, s3: Any
) -> None:
    """Batch mode and an edit chain on an s3:// output dir: the ledger and the manifests are parts
    in the bucket; a --no-wait run, then a run that collects, make every item once."""
    gw = gateway(flavor="gemini", batch_latency_s=0.15)
    url = f"s3://{BUCKET}/jobs/b"
    prompts = [{"id": "base", "template": "a {thing} on white", "vars": {"thing": ["cup", "vase"]}},
               {"id": "edit", "prompt": "put it on a beach", "images": ["@base"]}]  # fmt: skip
    path = write_spec(tmp_path, gw.base_url, prompts=prompts, output_dir=url, api_format="gemini", mode="batch",
                      batch={"max_requests": 2, "poll_s": 0.05})  # fmt: skip
    proc = run_cli("run", str(path), "--no-progress", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert "1 batch stays open on the server" in proc.stderr, proc.stderr
    assert not any(n.rsplit("/", 1)[-1].startswith("manifest") for n in s3.find(f"{BUCKET}/jobs/b"))
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(run_cli("report", url, "--json").stdout)
    assert (rep["ok"], rep["failed"], rep["spec_items"]) == (4, 0, 4)
    assert rep["batches"]["open"] == [] and rep["batches"]["collected"] == 2
    assert [(s["prompt_id"], s["ok"]) for s in rep["chains"]["steps"]] == [("base", 2), ("edit", 2)]
    stats = gw.stats()["google"]
    assert stats["double_submits"] == 0 and set(stats["paid_keys"].values()) == {1}
    before = stats["batches_created"]
    assert run_cli("run", str(path), "--no-progress").returncode == 0  # done: nothing more is submitted
    assert gw.stats()["google"]["batches_created"] == before
    assert not list(tmp_path.glob("out*")), "nothing is written locally"


def test_an_edit_chain_into_s3_sends_each_parent_image_made_in_the_run(
    tmp_path: Path, gateway: StartGateway, s3: Any
) -> None:
    gw = gateway()
    url = f"s3://{BUCKET}/jobs/c"
    prompts = [{"id": "base", "prompt": "a teapot on white"}, {"id": "edit", "prompt": "in snow", "images": ["@base"]}]
    path = write_spec(tmp_path, gw.base_url, prompts=prompts, output_dir=url)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(run_cli("report", url, "--json").stdout)
    assert (rep["ok"], rep["failed"], rep["requests"]) == (2, 0, 2)
    sent = [e["inputs"] for e in gw.stats()["requests_log"] if e["prompt"] == "in snow"]
    base = next(json.loads(x) for x in _manifest_lines(s3, f"{BUCKET}/jobs/c") if "teapot" in x)
    assert sent == [[base["sha256"]]]  # the child carried the image its parent made minutes before, from the bucket


def _manifest_lines(s3: Any, root: str) -> list[str]:
    names = [n for n in s3.find(root) if n.rsplit("/", 1)[-1].startswith("manifest")]
    return [line for n in names for line in s3.cat_file(n).decode().splitlines() if line.strip()]
