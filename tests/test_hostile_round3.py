"""Hardening, round 3 (issue 23): paid answers never thrown away, lies about images and errors caught,
the environment's settings read right. Each test sets up the hostile case; each failed before its fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.gateway.answer import Success, parse_completion
from runner.imageinfo import is_whole_image
from runner.policy import classify_error
from runner.safety import safe_json

from .conftest import latest, manifest_line, run_cli, write_spec
from .hostile import HUGE_USAGE, POLYGLOT, HostileServer, completion, image_md, png
from .test_hostile_gateway import GOOD, bad_prompt, run_against, strict_records

INT64 = (-(2**63), 2**63 - 1)


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    server.start()
    yield server
    server.stop()


def numbers(obj: Any) -> Iterator[int | float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


# 2. a PNG that is not a PNG ------------------------------------------------------------------------------------


def test_a_png_signature_polyglot_is_not_an_image() -> None:
    assert POLYGLOT.startswith(b"\x89PNG\r\n\x1a\n") and POLYGLOT.endswith(b"IEND\xaeB`\x82")
    assert not is_whole_image("image/png", POLYGLOT)
    assert is_whole_image("image/png", png(b"x"))


def test_a_polyglot_answer_is_invalid_response_and_never_paid(tmp_path: Path, hostile: HostileServer) -> None:
    _, recs = run_against(tmp_path, hostile, {"polyglot": "invalid_response"})
    assert "not a whole one" in recs[bad_prompt("polyglot")]["error"]["message"]


def test_verify_redoes_an_ok_image_whose_header_is_unreadable(tmp_path: Path, hostile: HostileServer) -> None:
    # An older runner recorded the polyglot ok (width and height null); --verify must not keep it.
    path = write_spec(tmp_path, hostile.base_url, prompts=GOOD)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    victim = latest(out)[next(iter(latest(out)))]
    image = out / victim["image_path"]
    image.write_bytes(POLYGLOT)
    line = manifest_line(out, victim["item_id"], prompt=victim["prompt"], image=POLYGLOT)
    line = {**line, "image_path": victim["image_path"], "mtime_ns": image.stat().st_mtime_ns}
    with (out / "manifest.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    before = sum(hostile.stats()["requests"].values())
    assert run_cli("run", str(path), "--no-progress", "--verify").returncode == 0
    assert sum(hostile.stats()["requests"].values()) == before + 1, "the unreadable image is bought again, only it"
    rec = latest(out)[victim["item_id"]]
    assert rec["status"] == "ok" and rec["width"] == rec["height"] == 8
    assert (out / rec["image_path"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")


# 3. an error inside a 200 --------------------------------------------------------------------------------------


def test_an_error_object_in_a_200_is_that_error() -> None:
    body = json.dumps({"error": {"code": 402, "message": "Insufficient credits"}}).encode()
    failure = parse_completion(body, None)
    assert not isinstance(failure, Success)
    assert (failure.kind, failure.status, failure.message) == ("no_balance", 402, "Insufficient credits")
    kinds = {
        "429": "rate_limited", "rate_limit_error": "rate_limited", "authentication_error": "auth",
        "insufficient_quota": "no_balance", "permission_error": "forbidden", "prompt_blocked": "prompt_blocked",
        "invalid_request_error": "bad_request", "whatever": "server_error",
    }  # fmt: skip
    for code, kind in kinds.items():
        assert classify_error({"code": code, "message": "m"}, None).kind == kind, code
        if not code.isdigit():
            assert classify_error({"type": code, "message": "m"}, None).kind == kind, code


def test_a_402_inside_a_200_aborts_as_no_balance_with_the_gateways_message(
    tmp_path: Path, hostile: HostileServer
) -> None:
    prompts = [bad_prompt("error200_402"), *(f"p{i}" for i in range(30))]
    path = write_spec(tmp_path, hostile.base_url, prompts=prompts, concurrency=1, max_attempts=3)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "no_balance: Insufficient credits" in proc.stderr and "top up the balance" in proc.stderr, proc.stderr
    assert sum(hostile.stats()["requests"].values()) == 1, "nothing more is sent after a run-fatal error"
    (rec,) = strict_records(tmp_path / "out")
    assert rec["error"] == {"kind": "no_balance", "status": 402, "message": "Insufficient credits"}


def test_a_429_inside_a_200_is_rate_limited_and_retried(tmp_path: Path, hostile: HostileServer) -> None:
    _, recs = run_against(tmp_path, hostile, {"error200_429": "rate_limited"}, max_attempts=2)
    rec = recs[bad_prompt("error200_429")]
    assert rec["attempts"] == 2 and rec["retried"] == {"rate_limited": 1} and rec["error"]["message"] == "slow down"


# 6. numbers no loader can hold ---------------------------------------------------------------------------------


def test_numbers_past_int64_are_never_json_numbers() -> None:
    usage = safe_json({"a": 2**63, "b": -(2**63) - 1, "c": 10**308, "d": 2**63 - 1, "e": float("nan"), "f": 1.5}, None)
    assert usage == {"a": None, "b": None, "c": None, "d": 2**63 - 1, "e": None, "f": 1.5}
    body = completion(json.dumps(image_md("x")), usage_json=HUGE_USAGE)
    answer = parse_completion(body, None)
    assert isinstance(answer, Success), answer  # a 5000-digit number does not make a paid answer unreadable
    assert answer.usage == {
        "prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "thoughts_tokens": None,
        "cached_tokens": None, "image_tokens": 1120,
    }  # fmt: skip


def test_absurd_usage_numbers_are_stored_as_null_and_the_item_is_ok(tmp_path: Path, hostile: HostileServer) -> None:
    _, recs = run_against(tmp_path, hostile, {"huge_usage": None})
    for rec in strict_records(tmp_path / "out"):
        assert all(INT64[0] <= n <= INT64[1] for n in numbers(rec) if isinstance(n, int)), rec
    assert recs[bad_prompt("huge_usage")]["usage"]["completion_tokens"] is None
