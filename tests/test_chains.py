"""Edit chains: one prompt's images feed another's, streamed through one run, resumed across steps."""

from __future__ import annotations

import gc
import json
import random
import signal
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartGateway, latest, run_cli, start_cli, write_spec
from .test_resume import assert_all_ok_and_intact, ok_lines, wait_for

BASE = {
    "id": "base",
    "template": "a studio photo of a {product} on white",
    "vars": {"product": ["mug", "lamp", "chair"]},
}
ROOM = {
    "id": "room",
    "template": "put the {product} in a {room}",
    "images": ["@base"],
    "vars": {"room": ["kitchen", "loft"]},
}
SEASON = {
    "id": "season",
    "template": "make it {season} outside",
    "images": ["@room"],
    "vars": {"season": ["winter", "summer"]},
}


def chain_spec(tmp_path: Path, base_url: str, prompts: list[Any] | None = None, **fields: Any) -> Path:
    return write_spec(tmp_path, base_url, model="nanobanana", prompts=prompts or [BASE, ROOM, SEASON], **fields)


def check_parents(out: Path, gw: Any) -> dict[str, dict[str, Any]]:
    """Every child names its parent's item and image, and the request the gateway got carried that image."""
    recs = latest(out)
    sent = {}
    for entry in gw.stats()["requests_log"]:
        sent.setdefault(entry["prompt"], []).append(entry["inputs"])
    for rec in recs.values():
        links = [i for i in rec.get("inputs", []) if "item_id" in i]
        if rec["prompt_id"] == "base":
            assert not links
            continue
        (link,) = links
        parent = recs[link["item_id"]]
        assert link["sha256"] == parent["sha256"] and link["path"] == parent["image_path"]
        assert [link["sha256"]] in sent[rec["prompt"]], "the gateway got the parent's image"
        for name, value in (parent["vars"] or {}).items():
            assert rec["vars"][name] == value  # labels merge, the parent's kept
    return recs


def test_a_three_step_chain_runs_in_one_run_and_each_child_carries_its_parent(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway()
    path = chain_spec(tmp_path, gw.base_url)
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert est["items"] == 3 + 6 + 12 and est["expected_children"] == 18
    assert {s["prompt_id"]: s["count"] for s in est["steps"]} == {"base": 3, "room": 6, "season": 12}
    assert any("as if every parent succeeds" in w for w in est["warnings"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    recs = check_parents(out, gw)
    assert Counter(r["prompt_id"] for r in recs.values()) == {"base": 3, "room": 6, "season": 12}
    assert len(recs) == est["items"]  # the estimate's count is the run's when every parent succeeds
    assert "18 more as their parents' images are made" in proc.stderr
    # a rerun walks the done parents to their done children: nothing is sent again
    before = gw.stats()["requests"]
    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0 and "all 21 items are done" in again.stderr
    assert gw.stats()["requests"] == before
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["expected_children"]) == (21, 21, 0)


def test_shared_labels_join_and_a_child_is_planned_before_the_last_roots_are_made(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway(latency_s=0.05)
    roots = {
        "id": "base",
        "template": "a {product}, take {take}",
        "vars": {"product": ["mug", "lamp"], "take": [str(i) for i in range(12)]},
    }
    edit = {"id": "edit", "template": "the {product} in {room}", "images": ["@base"],
            "vars": {"product": ["mug"], "room": ["a kitchen", "a loft"]}}  # fmt: skip
    path = chain_spec(tmp_path, gw.base_url, prompts=[roots, edit], concurrency=2)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    recs = check_parents(tmp_path / "out", gw)
    edits = [r for r in recs.values() if r["prompt_id"] == "edit"]
    assert len(edits) == 12 * 2 and all(r["vars"]["product"] == "mug" for r in edits)  # lamps have no edits
    # streaming, not stages: the first edit went out before the last root did
    order = [e["prompt"] for e in gw.stats()["requests_log"]]
    first_edit = next(i for i, p in enumerate(order) if p.startswith("the mug"))
    last_root = max(i for i, p in enumerate(order) if p.startswith("a "))
    assert first_edit < last_root


def test_a_failed_parent_blocks_its_children_and_a_rerun_that_fixes_it_runs_them(
    tmp_path: Path, gateway: StartGateway
) -> None:
    refusing, polite = gateway(fault_rates=(("content_filter", 1.0),)), gateway()
    base = {"id": "base", "prompt": "a chair", "vars": {"product": "chair"}}
    path = chain_spec(tmp_path, refusing.base_url, prompts=[base, ROOM])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1
    recs = latest(tmp_path / "out")
    assert [r["prompt_id"] for r in recs.values()] == ["base"]  # the edits were never sent
    report = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert report["chains"]["failed_parents"] == 1
    assert [(s["prompt_id"], s["parent"], s["ok"]) for s in report["chains"]["steps"]] == [
        ("base", None, 0),
        ("room", "base", 0),
    ]
    assert "1 parent failed: their edits are not sent" in run_cli("report", str(tmp_path / "out")).stdout
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert est["items"] == 3 and any(
        "2 of them are under parents that failed permanently" in w for w in est["warnings"]
    )
    proc = run_cli("run", str(path), "--no-progress", "--retry-failed", "--base-url", polite.base_url)
    assert proc.returncode == 0, proc.stderr
    assert Counter(r["prompt_id"] for r in latest(tmp_path / "out").values()) == {"base": 1, "room": 2}


def test_a_parent_made_again_gives_its_children_new_ids(tmp_path: Path, gateway: StartGateway) -> None:
    first, second = gateway(), gateway(fault_rates=(("uniform", 1.0),))  # the redo makes another image
    prompts = [{"id": "base", "prompt": "a lamp"}, {"id": "e", "prompt": "in a loft", "images": ["@base"]}]
    path = chain_spec(tmp_path, first.base_url, prompts=prompts)
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    old = {r["prompt_id"]: r for r in latest(out).values()}
    (out / old["base"]["image_path"]).unlink()  # the parent's image is lost: it is made again
    proc = run_cli("run", str(path), "--no-progress", "--base-url", second.base_url)
    assert proc.returncode == 0, proc.stderr
    new = {r["prompt_id"]: r for r in latest(out).values() if r["item_id"] != old["e"]["item_id"]}
    assert new["base"]["sha256"] != old["base"]["sha256"]
    assert new["e"]["item_id"] != old["e"]["item_id"]  # the child's id comes from its parent's image
    assert new["e"]["inputs"][0]["sha256"] == new["base"]["sha256"]
    assert second.stats()["requests"] == 2
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert report["items"] == 2 and report["older_records"] == 1  # what the spec asks for now: the new edit
    report = json.loads(run_cli("report", str(out), "--json", "--all-records").stdout)
    assert report["chains"]["stale"] == [old["e"]["item_id"]]


def test_shards_of_a_chain_each_run_whole_chains_and_the_report_counts_them_by_shard(
    tmp_path: Path, gateway: StartGateway
) -> None:
    """A chain's children go with their root's shard: two shards make the whole job once, and the
    report's shard table and expected total count each item where it was made."""
    gw = gateway()
    path = chain_spec(tmp_path, gw.base_url, prompts=[BASE, ROOM])  # 3 roots, 6 edits
    out = tmp_path / "out"
    homes: dict[str, int] = {}
    for k in (0, 1):
        proc = run_cli("run", str(path), "--no-progress", "--shard", f"{k}/2")
        assert proc.returncode == 0, proc.stderr
        for line in (out / f"manifest.shard-{k}-of-2.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert rec["item_id"] not in homes, "an item made by both shards"
            homes[rec["item_id"]] = k
    recs = check_parents(out, gw)
    assert len(recs) == 9 and gw.stats()["requests"] == 9
    for rec in recs.values():  # each edit was made by the shard that made its parent
        for link in rec.get("inputs", []):
            assert homes[rec["item_id"]] == homes[link["item_id"]]
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert report["spec_items"] == 9 and report["items"] == 9
    rows = report["shards"]["rows"]
    made = Counter(homes.values())
    assert [(r["ok"], r["expected"]) for r in rows] == [(made[0], made[0]), (made[1], made[1])]
    assert run_cli("run", str(path), "--no-progress", "--shard", "1/2").returncode == 0
    assert gw.stats()["requests"] == 9  # a finished shard's rerun sends nothing


def test_spec_errors_name_the_chain(tmp_path: Path) -> None:
    cases = [
        ([BASE, {"id": "e", "prompt": "x", "images": ["@nope"]}], "prompts[1].images[0]: @nope names no prompt"),
        ([{"id": "a", "prompt": "x", "images": ["@b"]}, {"id": "b", "prompt": "y", "images": ["@a"]}], "cycle: @a -> @b -> @a"),
        ([{"id": "a", "prompt": "x", "images": ["@a"]}], "cycle: @a -> @a"),
        ([BASE, {"id": "e", "prompt": "x", "images": ["@base", "@base"]}], "one @ID a prompt"),
        ([BASE, {"id": "e", "template": "{nope}", "images": ["@base"], "vars": {"room": ["a"]}}], "placeholder {nope} has no variable"),
    ]  # fmt: skip
    for prompts, message in cases:
        path = chain_spec(tmp_path, "http://127.0.0.1:9/v1", prompts=prompts)
        proc = run_cli("estimate", str(path))
        assert proc.returncode == 2 and message in proc.stderr, (message, proc.stderr)
    path = chain_spec(tmp_path, "http://127.0.0.1:9/v1", prompts=[BASE], images=["@base"])
    proc = run_cli("estimate", str(path))
    assert proc.returncode == 2 and "works in the images of a prompt under `prompts`" in proc.stderr


def test_kill_nine_through_a_chain_buys_nothing_twice(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.05, latency_jitter_s=0.1)
    path = chain_spec(tmp_path, gw.base_url, concurrency=3)
    out = tmp_path / "out"
    rng = random.Random(3)
    for _ in range(4):
        proc = start_cli("run", str(path), "--no-progress")
        target = ok_lines(out) + rng.randint(1, 5)
        wait_for(lambda t=target, p=proc: ok_lines(out) >= t or p.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    proc = start_cli("run", str(path), "--no-progress")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_all_ok_and_intact(out, 21)
    check_parents(out, gw)
    paid = Counter(e["prompt"] + json.dumps(e["inputs"]) for e in gw.stats()["requests_log"] if e["status"] == 200)
    # a request paid twice is one whose answer a kill caught in flight (at most the in-flight ones)
    assert sum(n - 1 for n in paid.values()) <= 4 * 3


def test_a_chain_in_batch_mode_submits_each_step_as_its_parents_are_collected(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=0.15)
    path = chain_spec(
        tmp_path, gw.base_url, api_format="gemini", mode="batch", batch={"max_requests": 4, "poll_s": 0.05},
    )  # fmt: skip
    # three steps, each submitted once its parents are collected: up to three turnarounds of 24 h
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert est["estimated_time_s"] == 3 * 24 * 3600 and "3 chain steps one after another" in est["time_basis"]
    said = run_cli("estimate", str(path)).stdout
    assert "time: up to 72.0 h" in said and "run it interactively (without `mode: batch`)" in said
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    recs = latest(out)
    assert Counter(r["prompt_id"] for r in recs.values()) == {"base": 3, "room": 6, "season": 12}
    assert json.loads(run_cli("estimate", str(path), "--json").stdout)["estimated_time_s"] == 0
    for rec in recs.values():
        for link in rec.get("inputs", []):
            assert recs[link["item_id"]]["sha256"] == link["sha256"]
    stats = gw.stats()["google"]
    assert stats["double_submits"] == 0 and set(stats["paid_keys"].values()) == {1}
    # each parent image went to the Files API once, not inline in every child's line
    assert stats["uploads"] == stats["batches_created"] + 3 + 6


def test_cancelling_the_batch_of_a_chains_parents_ends_the_waiting_run(tmp_path: Path, gateway: StartGateway) -> None:
    """The parents' batch cancelled while the run waits: their edits will not come in this run, so
    the run ends (it waited for ever for children of parents it had given up)."""
    gw = gateway(flavor="gemini", batch_latency_s=120)
    path = chain_spec(
        tmp_path, gw.base_url, api_format="gemini", mode="batch", batch={"max_requests": 4, "poll_s": 0.05}
    )
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    ledger = out / "batches.jsonl"
    wait_for(lambda: ledger.exists() and '"event": "created"' in ledger.read_text(), timeout=60)
    assert run_cli("cancel", str(out), "--base-url", gw.base_url, "--key-env", "RUNNER_TEST_KEY").returncode == 0
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "was cancelled: 3 items back to the to-do list" in err, err
    assert not latest(out)  # nothing was made, nothing recorded: a later run submits the parents


@pytest.mark.parametrize("mode", ["interactive", "batch"])
def test_the_example_job_runs_on_the_mock(tmp_path: Path, mode: str) -> None:
    from .conftest import ROOT

    spec = ROOT / "jobs" / "product-edits.yaml"
    extra = ["--out", str(tmp_path / "out")]
    if mode == "batch":
        text = spec.read_text() + "\napi_format: gemini\nmode: batch\nbatch: {max_requests: 8, poll_s: 0.1}\n"
        spec = tmp_path / "job.yaml"
        spec.write_text(text.replace("../sample_prompts", str(ROOT / "sample_prompts")))
    proc = run_cli("run", str(spec), "--mock", "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    assert ok_lines(tmp_path / "out") > 0


def test_quality_flags_an_edit_that_gave_its_source_back(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(fault_rates=(("same_image", 1.0),))  # one image for every request of a shape: the edit is its source
    prompts = [{"id": "base", "prompt": "a kettle"}, {"id": "e", "prompt": "make it red", "images": ["@base"]}]
    path = chain_spec(tmp_path, gw.base_url, prompts=prompts)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    report = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    edit = next(r for r in latest(tmp_path / "out").values() if r["prompt_id"] == "e")
    assert report["unchanged_edits"] == [edit["item_id"]]
    steps = {s["prompt_id"]: s for s in report["chains"]["steps"]}
    assert steps["e"]["parent"] == "base" and steps["e"]["ok"] == 1 and report["chains"]["stale"] == []
    assert "edits that gave their source image back: 1" in run_cli("report", str(tmp_path / "out")).stdout


def test_a_chain_exports_as_pairs_that_load_as_images(tmp_path: Path, gateway: StartGateway) -> None:
    import glob

    import webdataset as wds
    from datasets import load_dataset

    gw = gateway()
    path = chain_spec(tmp_path, gw.base_url, prompts=[BASE, ROOM])
    out = tmp_path / "out"
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert run_cli("export", str(out), "--to", str(tmp_path / "if")).returncode == 0
    assert run_cli("export", str(out), "--format", "webdataset", "--to", str(tmp_path / "wds")).returncode == 0
    recs = latest(out)
    ds = load_dataset("imagefolder", data_dir=str(tmp_path / "if"), split="train")
    edits = [row for row in ds if row["source_item_id"]]
    assert len(edits) == 6 and len(ds) == 9
    for row in edits:
        parent = recs[row["source_item_id"]]
        source = row["input_images"][0]  # the parent's image, loaded as an image
        assert source.size == (parent["width"], parent["height"]) and row["image"].size[0] > 0
        assert row["product"] == parent["vars"]["product"] and row["prompt"].startswith("put the")
    shards = sorted(glob.glob(str(tmp_path / "wds" / "shard-*.tar")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library leaves its shard files to the collector
        samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
        gc.collect()
    pairs = [s for s in samples if "input0.png" in s]
    assert len(pairs) == 6
    for s in pairs:
        (link,) = s["json"]["inputs"]
        assert link["item_id"] in recs and s["input0.png"].size[0] > 0
    card = (tmp_path / "if" / "README.md").read_text()
    assert "## Edit chain" in card and "| room | base | 6 |" in card


def test_a_reference_upload_that_fails_in_batch_mode_stops_the_run_saying_so(
    tmp_path: Path, gateway: StartGateway, tamper: Callable[..., Any]
) -> None:
    """A parent image whose upload to the Files API fails (a 503) ended the submitting quietly: the
    run exited 0, "every item ok", with 3 of 21 items made and the edits never sent. It is a stop
    (exit 3) that says why, and the next run makes the rest."""
    gw = gateway(flavor="gemini", batch_latency_s=0.15)
    starts = Counter[str]()

    def second_upload_fails(method: str, path: str) -> tuple[int, bytes] | None:
        if method != "POST" or not path.startswith("/upload/v1beta/files") or "upload_id" in path:
            return None
        starts["upload"] += 1  # the first is the base batch's requests file, the second a parent image
        return (503, b'{"error": {"code": 503, "message": "try later"}}') if starts["upload"] == 2 else None

    proxy = tamper(gw, lambda *answer: None, second_upload_fails)
    path = chain_spec(
        tmp_path, proxy.base_url, api_format="gemini", mode="batch", batch={"max_requests": 4, "poll_s": 0.05}
    )
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "could not upload reference images: try later" in proc.stderr
    proc = run_cli("run", str(path), "--no-progress", "--base-url", gw.base_url)
    assert proc.returncode == 0, proc.stderr
    assert len(latest(tmp_path / "out")) == 21
    assert set(gw.stats()["google"]["paid_keys"].values()) == {1}
