"""A hostile machine: planted symlinks and FIFOs, bombs in specs, damaged manifests, kills, stops and hang-ups."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.spec import load_spec
from runner.spec.items import iter_items

from .conftest import MockGateway, StartGateway, latest, read_manifest, run_cli, start_cli, write_spec
from .hostile import png

QUICK_S = 20  # "quickly": a bad spec is refused well within this


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def tree(root: Path) -> dict[str, Any]:
    """Every entry under root, links not followed: a file's bytes and mtime, a link's target, a dir."""
    entries: dict[str, Any] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                entries[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                entries[rel] = ("dir",)
            else:
                entries[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
    return entries


def item_ids(spec: Path) -> dict[str, str]:
    return {item.prompt: item.item_id for item in iter_items(load_spec(spec))}


def assert_whole_inside(out: Path, n: int) -> None:
    """n items, each ok, each image inside the output dir (links resolved) with its recorded sha256."""
    recs = latest(out)
    assert len(recs) == n and all(r["status"] == "ok" for r in recs.values()), recs
    real = out.resolve()
    for r in recs.values():
        image = (out / r["image_path"]).resolve()
        assert image.is_relative_to(real), image
        assert hashlib.sha256(image.read_bytes()).hexdigest() == r["sha256"]


# 8. symlinks planted in the output dir ---------------------------------------------------------------------------

PLANTED = [
    ".lock", ".manifest.jsonl.idx.tmp", ".manifest.jsonl.idx", "manifest.jsonl", "manifest.jsonl.torn",
    "spec.json", "images/<xx>", "images",
]  # fmt: skip


@pytest.mark.parametrize("planted", PLANTED)
def test_a_symlink_planted_in_the_output_dir_is_never_followed_out(
    tmp_path: Path, mock: MockGateway, planted: str
) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    victim = outside / "victim"
    victim.write_bytes(b"precious, not a manifest line\n")
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c", "d", "e", "f"])
    target: Path = victim
    if planted == "images/<xx>":  # the folder of a new item, which no old item uses
        ids = item_ids(path)
        used = {ids["a"][:2], ids["b"][:2]}
        planted = "images/" + next(i[:2] for p, i in ids.items() if p not in ("a", "b") and i[:2] not in used)
        target = outside / "dir"
    elif planted == "images":
        target = outside / "dir"
    elif planted == ".manifest.jsonl.idx.tmp":
        (out / ".manifest.jsonl.idx").unlink()  # so that the run rebuilds the index through the temp file
    elif planted == "manifest.jsonl.torn":
        manifest = out / "manifest.jsonl"
        manifest.write_bytes(manifest.read_bytes()[:-40])  # a torn last line, which the run sets aside
    link = out / planted
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    else:
        link.unlink(missing_ok=True)
    link.symlink_to(target)
    before = tree(outside)
    proc = run_cli("run", str(path), "--no-progress", timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert tree(outside) == before, "something outside the output dir was created, changed or truncated"
    assert proc.returncode in (0, 3), proc.stderr
    if proc.returncode == 3:
        assert planted in proc.stderr, proc.stderr
    else:
        assert_whole_inside(out, 6)


def test_an_output_dir_that_is_itself_a_symlink_works(tmp_path: Path, mock: MockGateway) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"])
    for _ in range(2):  # a run, then a resume that finds everything done
        proc = run_cli("run", str(path), "--no-progress")
        assert proc.returncode == 0, proc.stderr
    assert_whole_inside(tmp_path / "out", 3)
    assert len(list((real / "images").rglob("*.png"))) == 3
    assert mock.stats()["requests"] == 3


# 9. a FIFO where the index belongs -------------------------------------------------------------------------------


def test_a_fifo_at_the_index_path_neither_hangs_estimate_nor_run(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    index = tmp_path / "out" / ".manifest.jsonl.idx"
    index.unlink()
    os.mkfifo(index)
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"])
    est = run_cli("estimate", str(path), "--json", timeout=30)
    assert est.returncode == 0 and "Traceback" not in est.stderr, est.stderr
    assert json.loads(est.stdout)["done"] == 2
    proc = run_cli("run", str(path), "--no-progress", timeout=30)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert ".manifest.jsonl.idx" in proc.stderr
    assert mock.stats()["requests"] == 2


# 10. specs that bomb, explode, or do not decode -------------------------------------------------------------------


def alias_bomb() -> str:
    """Nine nested levels of ten aliases, each level's anchor defined inside its own first element."""
    value = "&a [x, x, x, x, x, x, x, x, x, x]"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        value = f"&{name} [{value}, " + ", ".join([f"*{prev}"] * 9) + "]"
    return value


def spec_text(tmp_path: Path, body: str) -> Path:
    path = write_spec(tmp_path, prompts=None)
    path.write_text(path.read_text() + body)
    return path


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


@pytest.mark.parametrize(
    "placement",
    [
        "prompts:\n- {{id: {bomb}, prompt: hi}}\n",
        "prompts:\n- {{id: t, template: '{{v}}', vars: {{v: {bomb}}}}}\n",
        "prompts: {bomb}\n",
    ],
    ids=["id", "vars", "prompts"],
)
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path, placement: str) -> None:
    path = spec_text(tmp_path, placement.format(bomb=alias_bomb()))
    assert len(path.read_bytes()) < 1200
    assert_refused(run_cli("estimate", str(path), timeout=QUICK_S), "job.yaml")


def five_by_hundred(sample: int | None) -> dict[str, Any]:
    template: dict[str, Any] = {
        "id": "big",
        "template": "{a} {b} {c} {d} {e}",
        "vars": {name: [f"{name}{i}" for i in range(100)] for name in "abcde"},
    }
    if sample is not None:
        template.update(sample=sample, seed=7)
    return template


def test_a_sample_of_ten_billion_combinations_does_not_enumerate_them(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=[five_by_hundred(10)])
    proc = run_cli("estimate", str(path), "--json", timeout=QUICK_S)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["items"] == 10


def test_ten_billion_combinations_without_a_sample_are_refused(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=[five_by_hundred(None)])
    proc = run_cli("estimate", str(path), "--json", timeout=QUICK_S)
    assert_refused(proc, "combination")
    assert re.search(r"10[,_ ]?000[,_ ]?000[,_ ]?000|1(\.0+)?e\+?10|10\^10|10\*\*10", proc.stderr), proc.stderr
    assert re.search(r"limit|at most|more than", proc.stderr, re.I), proc.stderr


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("prompts.csv", b"id,prompt\nx,a cat\ny,a \xff dog\n", 3),
        ("prompts.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a \xff dog"}\n', 2),
        ("values.txt", b"red\nbl\xffue\n", 2),
        ("broken.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a d\n{"prompt": "an owl"}\n', 2),
    ],
)
def test_an_undecodable_or_malformed_input_file_is_named_with_its_line(
    tmp_path: Path, name: str, data: bytes, line: int
) -> None:
    (tmp_path / name).write_bytes(data)
    if name == "values.txt":
        path = write_spec(tmp_path, prompts=[{"id": "t", "template": "a {c} cat", "vars": {"c": {"file": name}}}])
    else:
        path = write_spec(tmp_path, prompts=["a fox"], prompt_files=[name])
    proc = run_cli("estimate", str(path), timeout=QUICK_S)
    assert_refused(proc, name)
    assert re.search(rf"line {line}\b|{re.escape(name)}:{line}\b", proc.stderr), proc.stderr


def test_a_lone_surrogate_in_the_yaml_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = spec_text(tmp_path, 'prompts: ["a cat", "\\ud800"]\n')
    assert_refused(run_cli("estimate", str(path), timeout=QUICK_S), "job.yaml", "prompts")


@pytest.mark.parametrize(
    ("fields", "args"),
    [
        ({"max_cost_usd": float("nan")}, ()),
        ({"timeout_s": float("nan")}, ()),
        ({"requests_per_minute": float("inf")}, ()),
        ({}, ("--max-cost", "nan")),
        ({}, ("--max-cost", "-1")),
    ],
    ids=["max_cost_usd-nan", "timeout_s-nan", "rpm-inf", "--max-cost-nan", "--max-cost-minus-1"],
)
def test_a_number_that_is_not_finite_or_is_negative_is_refused(
    tmp_path: Path, mock: MockGateway, fields: dict[str, float], args: tuple[str, ...]
) -> None:
    path = write_spec(tmp_path, mock.base_url, **fields)
    assert_refused(run_cli("run", str(path), "--no-progress", *args, timeout=QUICK_S))
    assert mock.stats()["requests"] == 0


def test_a_base_url_with_credentials_is_refused_without_printing_them(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url)
    url = f"http://user:secret@127.0.0.1:{mock.port}/v1"
    proc = run_cli("run", str(path), "--no-progress", "--base-url", url, timeout=QUICK_S)
    assert_refused(proc)
    assert "secret" not in proc.stdout + proc.stderr
    assert mock.stats()["requests"] == 0


# 11. hand-edited manifest lines ---------------------------------------------------------------------------------


def test_damaged_manifest_lines_of_any_shape_are_set_aside_counted_and_their_items_recovered(
    tmp_path: Path, mock: MockGateway
) -> None:
    prompts = [f"p{i}" for i in range(8)]
    path = write_spec(tmp_path, mock.base_url, prompts=prompts, output_dir="run/out")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "run" / "out"
    manifest = out / "manifest.jsonl"
    lines = {json.loads(raw)["prompt"]: raw for raw in manifest.read_bytes().splitlines()}
    recs = {p: json.loads(raw) for p, raw in lines.items()}
    outside = tmp_path / "outside.png"  # what "../../outside.png" names from the output dir
    outside.write_bytes((out / recs["p6"]["image_path"]).read_bytes())

    def edited(prompt: str, **changes: Any) -> bytes:
        return json.dumps({**recs[prompt], **changes}).encode()

    damaged = [
        edited("p2", status="failed", error="boom"),
        edited("p3", cost_usd="abc"),
        edited("p4", status=7),
        json.dumps([recs["p5"]]).encode(),
        edited("p6", image_path="../../outside.png"),
        lines["p7"].replace(b'"prompt": "p7"', b'"prompt": "p7\xff\xfe"'),
    ]
    manifest.write_bytes(b"\n".join([lines["p0"], *damaged[:3], lines["p1"], *damaged[3:]]) + b"\n")
    (out / ".manifest.jsonl.idx").unlink(missing_ok=True)
    outside_before = (outside.read_bytes(), outside.stat().st_mtime_ns)

    for args in (("report", str(out)), ("report", str(out), "--json"), ("estimate", str(path)), ("estimate", str(path), "--json")):  # fmt: skip
        proc = run_cli(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        if args[-1] != "--json":  # says how many lines it could not use
            assert re.search(COUNTED, proc.stdout + proc.stderr, re.I | re.M), (args, proc.stdout, proc.stderr)
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert (report["ok"], report["bad_lines"]) == (2, 6)
    assert json.loads(run_cli("estimate", str(path), "--json").stdout)["done"] == 2

    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(COUNTED, proc.stderr, re.I | re.M), proc.stderr
    torn = (out / "manifest.jsonl.torn").read_bytes()
    assert all(line in torn for line in damaged)
    for raw in manifest.read_bytes().splitlines():
        rec = json.loads(raw.decode("utf-8"))
        assert isinstance(rec, dict) and rec["status"] == "ok" and not rec["image_path"].startswith("..")
    # the six items lost their lines but their whole images are on disk: recorded again, not bought again
    assert mock.stats()["requests"] == 8
    recovered = [json.loads(raw)["prompt"] for raw in manifest.read_bytes().splitlines() if b'"recovered"' in raw]
    assert sorted(recovered) == [f"p{i}" for i in range(2, 8)]
    assert_whole_inside(out, 8)
    assert json.loads(run_cli("report", str(out), "--json").stdout)["ok"] == 8
    assert (outside.read_bytes(), outside.stat().st_mtime_ns) == outside_before


COUNTED = r"\b6\b[^\n]*(line|damaged|set aside|unreadable)"


# 12. nothing paid for twice that is in hand ---------------------------------------------------------------------


def test_whole_images_without_lines_are_adopted_and_truncated_ones_bought_again(
    tmp_path: Path, mock: MockGateway
) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c", "d", "e"])
    out = tmp_path / "out"
    ids = item_ids(path)
    planted = {}
    for prompt in ("c", "d", "e"):  # saved whole just before a kill -9; "e" cut short
        data = png(prompt.encode(), side=16)
        image = out / "images" / ids[prompt][:2] / f"{ids[prompt]}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(data if prompt != "e" else data[: len(data) // 2])
        planted[prompt] = hashlib.sha256(data).hexdigest()
    dead = subprocess.Popen(["true"])
    dead.wait()
    temps = [
        out / "images" / "ab" / f".ab{'0' * 18}.png.{dead.pid}.tmp",
        out / ".manifest.jsonl.idx.tmp",
    ]
    for temp in temps:
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"left by a death")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert mock.stats()["by_prompt"] == {"a": 1, "b": 1, "e": 1}
    recs = {r["prompt"]: r for r in latest(out).values()}
    for prompt in ("c", "d"):
        assert recs[prompt]["status"] == "ok" and recs[prompt].get("recovered") is True, recs[prompt]
        assert recs[prompt]["sha256"] == planted[prompt]
    assert recs["e"]["status"] == "ok" and not recs["e"].get("recovered")
    assert_whole_inside(out, 5)
    assert [t for t in temps if t.exists()] == []


# 13-15. signals, shards, stops ----------------------------------------------------------------------------------


def test_a_hang_up_drains_like_sigterm(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=1.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(12)], concurrency=3)
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["in_flight"] == 3)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err, err
    oks = [r for r in read_manifest(tmp_path / "out") if r["status"] == "ok"]
    assert len(oks) == gw.stats()["generations"] >= 3
    assert gw.stats()["requests"] < 12


def test_shards_of_different_counts_on_one_dir_are_refused(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=1.0)  # the first shard runs ~3 s, long after the others start
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(12)], concurrency=2)
    first = start_cli("run", str(path), "--no-progress", "--shard", "0/2")
    wait_for(lambda: gw.stats()["in_flight"] >= 1)
    other = run_cli("run", str(path), "--no-progress", "--shard", "0/3", timeout=60)
    assert other.returncode == 3 and "Traceback" not in other.stderr, other.stderr[-2000:]
    message = other.stderr.replace(str(tmp_path), "")
    assert "shard" in message.lower() and re.search(r"\b2\b", message), message
    same = run_cli("run", str(path), "--no-progress", "--shard", "1/2", timeout=60)
    assert same.returncode == 0, same.stderr[-2000:]
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert gw.stats()["generations"] == 12 and set(gw.stats()["by_prompt"].values()) == {1}


def test_an_answer_that_arrived_while_stopped_is_kept(tmp_path: Path, gateway: StartGateway) -> None:
    timeout_s = 2.0
    gw = gateway(latency_s=0.5)
    path = write_spec(tmp_path, gw.base_url, prompts=["a", "b", "c"], concurrency=3, timeout_s=timeout_s)
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: gw.stats()["in_flight"] == 3)
    proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: gw.stats()["generations"] == 3 and gw.stats()["in_flight"] == 0)
        # The stop's length is the case itself (Ctrl+Z, a suspended laptop): past timeout_s.
        time.sleep(max(0.0, stopped + timeout_s + 1.0 - time.monotonic()))
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert gw.stats()["generations"] == 3
    assert_whole_inside(tmp_path / "out", 3)
