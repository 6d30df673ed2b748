"""Hardening, round 4: hostile answers of Google's API, edit chains, export and S3 output. Each test
sets up the hostile case; each failed before its fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import StartGateway, latest, run_cli, write_spec
from .tamper import TamperProxy

StartTamper = Callable[..., TamperProxy]


def generate(path: str) -> bool:
    return path.endswith(":generateContent")


@pytest.mark.parametrize("finish", [["STOP"], {"reason": "SAFETY"}, 7])
def test_a_finish_reason_that_is_not_a_string_is_no_bug(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper, finish: object
) -> None:
    """Google's finishReason is an enum name; one of another JSON type is read as no reason given,
    never as a bug in runner (`internal`)."""
    gw = gateway(flavor="gemini")

    def odd(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if not generate(path) or status != 200:
            return None
        answer = json.loads(body)
        answer["candidates"][0]["finishReason"] = finish
        return status, json.dumps(answer).encode()

    proxy = tamper(gw, odd)
    path = write_spec(tmp_path, proxy.base_url, api_format="gemini", prompts=["a stork", "a crane"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in latest(tmp_path / "out").values()] == ["ok", "ok"]
