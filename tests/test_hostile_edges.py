"""Edges a review found: many images to recover, keys in pieces, slow patterns, odd lines, files changed mid-run."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.gateway.answer import Success, parse_completion
from runner.mock import render_image
from runner.record import check
from runner.safety import clean_message, safe_text

from .conftest import KEY, MockGateway, StartGateway, cli_env, read_manifest, run_cli, start_cli, write_spec

PNG = render_image(16, 9, b"edge")
URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


def answer(message: dict[str, object]) -> bytes:
    return json.dumps({"id": "x", "choices": [{"message": message, "finish_reason": "stop"}]}).encode()


def test_many_images_on_disk_without_lines_are_recovered_without_hanging(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=[f"p{i}" for i in range(24)], concurrency=2)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    (out / "manifest.jsonl").unlink()  # every line lost, every image whole: 12 x the concurrency to recover
    (out / ".manifest.jsonl.idx").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "run", str(path), "--no-progress"],
        capture_output=True, text=True, env=cli_env(), timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert mock.stats()["requests"] == 24  # nothing bought twice
    assert sum(1 for r in read_manifest(out) if r.get("recovered")) == 24


@pytest.mark.parametrize(
    "text",
    [
        f"a {KEY[:6]}\n{KEY[6:]} b",  # a newline inside the key
        f"{KEY[:5]}\u200e{KEY[5:]}",  # a left-to-right mark
        f"{KEY[:4]}\x07{KEY[4:]}",  # a bell
        "x" * 95 + KEY,  # the key across the length cut
        f"{KEY[:9]} {KEY[9:]}",  # a space: long pieces of the key still go
        KEY[3:11],  # short texts (an answer's id, a usage key) are looked up by their own pieces
        f"req-{KEY[10:19]}",
        f"{KEY[-8:]}!",
    ],
)
def test_a_key_in_pieces_is_still_scrubbed(text: str) -> None:
    for safe in (safe_text(text, KEY, limit=100), clean_message(text, KEY)):
        assert KEY not in safe.replace("\n", "").replace(" ", "")
        assert not any(KEY[i : i + 8] in safe for i in range(len(KEY) - 7))


def test_a_pathological_answer_is_read_in_linear_time() -> None:
    started = time.process_time()
    out = parse_completion(answer({"content": "![" * 200_000}))  # 27 s of CPU with an unbounded pattern
    assert out.kind == "no_image" and time.process_time() - started < 5  # type: ignore[union-attr]
    big = b'{"choices": [' + b"{}," * 1_000_000 + b"{}]}"  # 3 MB of JSON with no image: 1.5 GB once parsed
    out = parse_completion(big)
    assert out.kind == "invalid_response" and "no image" in out.message  # type: ignore[union-attr]


def test_one_image_in_content_and_in_message_images_is_one_image() -> None:
    out = parse_completion(answer({"content": f"![image]({URI})", "images": [{"image_url": {"url": URI}}]}))
    assert isinstance(out, Success) and len(out.images) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"item_id": "ab12\t"},
        {"item_id": "0x1f"},
        {"image_path": "images/ab/x\t.png"},
        {"extra_images": [{"image_path": "images/ab/y.png", "bytes": 1, "sha256": "s", "mime": 5}]},
        {"inputs": [{"path": "a.png", "mime": 5}]},
        {"inputs": [{"path": "a.png", "stored": "../../etc/passwd"}]},
    ],
)
def test_record_check_refuses_odd_shapes_inside(changes: dict[str, object]) -> None:
    good = {"item_id": "ab12", "status": "ok", "image_path": "images/ab/ab12.png", "bytes": 1, "sha256": "s"}
    assert check(good) is not None and check({**good, **changes}) is None


def test_an_odd_line_never_makes_a_run_exit_70(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    manifest = tmp_path / "out" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[0])
    manifest.write_text("\n".join([json.dumps({**rec, "item_id": rec["item_id"] + "\t"}), *lines[1:]]) + "\n")
    (tmp_path / "out" / ".manifest.jsonl.idx").unlink()
    for _ in range(2):
        proc = run_cli("run", str(path), "--no-progress")
        assert proc.returncode == 0 and "internal error" not in proc.stderr, proc.stderr
    assert run_cli("estimate", str(path)).returncode == 0
    assert mock.stats()["requests"] == 2  # the item's image was whole on disk: recovered


def test_a_prompt_file_changed_mid_run_stops_it_and_keeps_what_was_sent(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.5)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6)))
    path = write_spec(tmp_path, gw.base_url, prompts=None, prompt_files=["p.jsonl"], concurrency=1)
    proc = start_cli("run", str(path), "--no-progress")
    deadline = time.monotonic() + 30
    while gw.stats()["in_flight"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with (tmp_path / "p.jsonl").open("a") as f:  # the job's file changes under it
        f.write(json.dumps({"prompt": "new", "images": ["missing.png"]}) + "\n")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "changed during the run" in err and "missing.png" in err, err
    assert len(read_manifest(tmp_path / "out")) == gw.stats()["requests"]  # every answer sent is recorded


def test_an_abort_does_not_send_what_waits_for_a_rate_slot(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(api_key="sk-the-right-one")
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(8)], concurrency=4, requests_per_minute=6)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3
    assert gw.stats()["requests"] == 1  # the others were waiting 10, 20, 30 s for their slots


def test_placeholders_are_plain_names(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=[{"id": "t", "template": "a {x:>300000000}", "vars": {"x": ["cat"]}}])
    proc = run_cli("estimate", str(path), timeout=30)
    assert proc.returncode == 2 and "must be a plain name" in proc.stderr


def test_globs_match_inside_a_folder_whose_name_has_brackets(tmp_path: Path, mock: MockGateway) -> None:
    folder = tmp_path / "jobs[v2]"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "a.png").write_bytes(render_image(8, 8, b"a"))
    path = write_spec(folder, mock.base_url, prompts=[{"prompt": "x", "images": ["refs/*.png"]}])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr


def test_export_refuses_a_link_planted_where_its_folder_goes(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "shard-000099.tar").write_bytes(b"keep me")
    (tmp_path / "out" / "webdataset").symlink_to(victim)
    proc = run_cli("export", str(tmp_path / "out"), "--format", "webdataset")
    assert proc.returncode == 3 and "symbolic link" in proc.stderr
    assert [p.name for p in victim.iterdir()] == ["shard-000099.tar"]
    assert (victim / "shard-000099.tar").read_bytes() == b"keep me"
