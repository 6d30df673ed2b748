"""End to end: the CLI against the mock gateway over real sockets, then the files it wrote."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from .conftest import KEY, MockGateway, StartGateway, latest, read_manifest, run_cli, write_spec

FIELDS = {
    "item_id", "prompt_id", "prompt", "model", "image_config", "repeat", "status", "attempts",
    "request_id", "usage", "cost_usd", "latency_s", "finished_at", "vars",
}  # fmt: skip


def test_demo_job_runs_on_the_built_in_mock(tmp_path: Path) -> None:
    proc = run_cli(
        "run",
        str(Path(__file__).parent.parent / "jobs" / "demo.yaml"),
        "--mock",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_manifest(tmp_path / "o")
    assert len(records) == 15 and all(r["status"] == "ok" for r in records)


def test_a_run_writes_images_and_a_complete_manifest(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(
        tmp_path,
        mock.base_url,
        image_configs=[{"aspect_ratio": "16:9", "image_size": "2K"}, {"aspect_ratio": "1:1"}],
        prompts=[
            "a cat",
            {"id": "fox", "prompt": "a fox", "model": "nanobanana", "image_configs": [{"aspect_ratio": "4:3"}]},
        ],
        repeats=2,
    )
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    records = read_manifest(out)
    assert len(records) == 2 * 2 + 2
    for r in records:
        assert set(r) >= FIELDS, FIELDS - set(r)
        assert r["status"] == "ok" and r["attempts"] == 1
        assert r["request_id"].startswith("chatcmpl-")
        assert r["usage"]["completion_tokens"] > 0
        data = (out / r["image_path"]).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and r["mime"] == "image/png"
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        assert re.fullmatch(r"images/[0-9a-f]{2}/[0-9a-f]{20}\.png", r["image_path"])
    fox = [r for r in records if r["prompt_id"] == "fox"]
    assert {r["model"] for r in fox} == {"nanobanana"} and {r["cost_usd"] for r in fox} == {0.039}
    assert {json.dumps(r["image_config"]) for r in records if r["prompt"] == "a cat"} == {
        '{"aspect_ratio": "16:9", "image_size": "2K"}',
        '{"aspect_ratio": "1:1", "image_size": null}',
    }
    stats = mock.stats()
    assert stats["requests"] == stats["generations"] == 6
    assert stats["auth_headers_seen"] == [f"Bearer {KEY}"]
    # the key is in no file the run wrote, and in nothing it printed
    for f in out.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    assert KEY not in proc.stdout + proc.stderr


def test_a_rerun_of_a_finished_job_sends_nothing(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    before = mock.stats()["requests"]
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0
    assert mock.stats()["requests"] == before == 2
    assert "2 already done (skipped)" in proc.stderr
    assert len(read_manifest(tmp_path / "out")) == 2


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_failures_become_records_with_kinds_and_the_run_goes_on(
    tmp_path: Path, mock: MockGateway, transport: str
) -> None:
    prompts = {
        "fine": "ok",
        "flaky [fault:503x2]": "ok",
        "dropped [fault:dropx1]": "ok",
        "cut off [fault:truncatex1]": "ok",
        "html page [fault:htmlx1]": "ok",
        "garbage [fault:badjsonx1]": "ok",
        "rejected [fault:400]": "bad_request",
        "blocked [fault:prompt_blocked]": "prompt_blocked",
        "filtered [fault:content_filter]": "content_filter",
        "chatty [fault:text_only]": "no_image",
        "not a picture [fault:not_image]": "invalid_response",
        "overloaded [fault:503]": "server_error",
        "always dropped [fault:drop]": "connection",
        "always cut off [fault:truncate]": "connection",
    }
    path = write_spec(tmp_path, mock.base_url, prompts=list(prompts), max_consecutive_failures=50)
    proc = run_cli("run", str(path), "--no-progress", env={"RUNNER_HTTP_TRANSPORT": transport})
    assert proc.returncode == 1, proc.stderr
    recs = {r["prompt"]: r for r in latest(tmp_path / "out").values()}
    by_prompt = mock.stats()["by_prompt"]
    for prompt, expected in prompts.items():
        r = recs[prompt]
        if expected == "ok":
            assert r["status"] == "ok", r
        else:
            assert r["status"] == "failed" and r["error"]["kind"] == expected, r
            assert r["cost_usd"] == 0 and "image_path" not in r
            assert isinstance(r["error"]["message"], str) and r["error"]["message"]
    # permanent failures cost exactly one request; retryable ones are retried up to max_attempts
    for p in (
        "rejected [fault:400]",
        "blocked [fault:prompt_blocked]",
        "filtered [fault:content_filter]",
        "chatty [fault:text_only]",
    ):
        assert by_prompt[p] == 1 and recs[p]["attempts"] == 1
    assert by_prompt["flaky [fault:503x2]"] == 3 and recs["flaky [fault:503x2]"]["attempts"] == 3
    assert by_prompt["overloaded [fault:503]"] == 4 and recs["overloaded [fault:503]"]["error"]["status"] == 503
    assert recs["rejected [fault:400]"]["error"]["status"] == 400


def test_retry_failed_retries_permanent_failures(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["fine", "rejected [fault:400]"])
    assert run_cli("run", str(path), "--no-progress").returncode == 1
    proc = run_cli("run", str(path), "--no-progress")
    # still exit 1: not every item is ok, though nothing was sent
    assert proc.returncode == 1 and "1 failed permanently before (skipped; --retry-failed retries them)" in proc.stderr
    assert mock.stats()["by_prompt"]["rejected [fault:400]"] == 1
    assert run_cli("run", str(path), "--no-progress", "--retry-failed").returncode == 1
    assert mock.stats()["by_prompt"]["rejected [fault:400]"] == 2


def test_concurrency_is_never_exceeded(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.15)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{n}" for n in range(24)], concurrency=5)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    stats = gw.stats()
    assert stats["max_in_flight"] == 5
    assert stats["generations"] == 24


def test_report_and_export_read_what_the_run_wrote(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["fine", "also fine", "rejected [fault:400]"])
    run_cli("run", str(path), "--no-progress")
    proc = run_cli("report", str(tmp_path / "out"), "--json", "--html", str(tmp_path / "g.html"))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert (rep["ok"], rep["failed"], rep["failures_by_kind"]) == (2, 1, {"bad_request": 1})
    assert rep["cost_usd"] == round(2 * 0.134, 6)
    assert rep["latency_s"]["p50"] is not None
    html = (tmp_path / "g.html").read_text()
    # the gallery derives each image's path from its item id (a compact data island)
    assert all(r["item_id"] in html for r in read_manifest(tmp_path / "out") if r["status"] == "ok")
    assert run_cli("export", str(tmp_path / "out")).returncode == 0
    meta = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["prompt"] for m in meta) == ["also fine", "fine"]
    assert all((tmp_path / "out" / m["file_name"]).is_file() for m in meta)


def test_timeouts_are_retried_and_recorded(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(
        tmp_path,
        mock.base_url,
        prompts=["late once [fault:slowx1]", "never [fault:slow]"],
        timeout_s=0.5,
        max_attempts=2,
    )
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1
    recs = {r["prompt"]: r for r in latest(tmp_path / "out").values()}
    assert recs["late once [fault:slowx1]"]["status"] == "ok" and recs["late once [fault:slowx1]"]["attempts"] == 2
    never = recs["never [fault:slow]"]
    assert (
        never["error"] == {"kind": "timeout", "status": None, "message": never["error"]["message"]}
        and never["attempts"] == 2
    )


def test_two_images_in_one_answer_are_both_kept(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["twins [fault:two_images]"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    (rec,) = read_manifest(tmp_path / "out")
    assert len(rec["extra_images"]) == 1 and rec["cost_usd"] == round(2 * 0.134, 6)
    extra = rec["extra_images"][0]
    data = (tmp_path / "out" / extra["image_path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == extra["sha256"] and extra["image_path"].endswith("-1.png")


@pytest.mark.parametrize("mime", ["jpeg", "webp"])
def test_jpeg_and_webp_answers_are_saved_with_their_extension(tmp_path: Path, gateway: StartGateway, mime: str) -> None:
    pytest.importorskip("PIL", reason="the mock makes jpeg and webp with Pillow")
    gw = gateway(mime=mime)
    path = write_spec(tmp_path, gw.base_url, prompts=["a cat"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    (rec,) = read_manifest(tmp_path / "out")
    assert rec["mime"] == f"image/{mime}" and rec["image_path"].endswith(".jpg" if mime == "jpeg" else ".webp")
    assert hashlib.sha256((tmp_path / "out" / rec["image_path"]).read_bytes()).hexdigest() == rec["sha256"]
