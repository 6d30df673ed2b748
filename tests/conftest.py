"""Shared fixtures: a mock gateway on a loopback port, spec files, and the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import cli
from runner.mock import MockConfig, MockGateway

ROOT = Path(__file__).resolve().parent.parent
StartGateway = Callable[..., MockGateway]
KEY = "sk-test-4f9c2a7e1b"  # a fake key; tests check it never lands in a file


@pytest.fixture
def gateway() -> Iterator[Callable[..., MockGateway]]:
    """Start mock gateways with the given MockConfig fields; all are stopped after the test."""
    started: list[MockGateway] = []

    def start(**config: Any) -> MockGateway:
        gw = MockGateway(MockConfig(**config))
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def mock(gateway: Callable[..., MockGateway]) -> MockGateway:
    return gateway()


def write_spec(directory: Path, base_url: str = "http://127.0.0.1:9/v1", **fields: Any) -> Path:
    """A job spec in `directory` with fast test defaults; `fields` override or add keys."""
    spec: dict[str, Any] = {
        "name": "t",
        "model": "nanobanana_pro",
        "image_configs": [{"aspect_ratio": "1:1"}],
        "prompts": ["a cat", "a dog"],
        "output_dir": "out",
        "base_url": base_url,
        "api_key_env": "RUNNER_TEST_KEY",
        "concurrency": 4,
        "max_attempts": 4,
        "timeout_s": 10,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    spec.update(fields)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_env(key: str | None = KEY, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_TEST_KEY"}
    if key is not None:
        env["RUNNER_TEST_KEY"] = key
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(
    *args: str, key: str | None = KEY, timeout: float | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ARGS as a user would, and capture what it prints.

    In this process (`cli.main`, with its own environment and captured output: a spawn per call
    made the suite slow), unless a `timeout` is given: a call that must be shown not to hang
    runs as `python -m runner` in a subprocess that the timeout can kill."""
    if timeout is not None or os.environ.get("RUNNER_TEST_SUBPROCESS"):
        return subprocess.run(
            [sys.executable, "-m", "runner", *args],
            capture_output=True,
            text=True,
            env=cli_env(key, **(env or {})),
            timeout=timeout or 120,
            check=False,
        )
    out, err = io.StringIO(), io.StringIO()
    saved, wanted = dict(os.environ), cli_env(key, **(env or {}))
    os.environ.clear()
    os.environ.update(wanted)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # --help, and argparse's own usage errors
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["runner", *args], code, out.getvalue(), err.getvalue())


def start_cli(*args: str, key: str | None = KEY) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(key),
    )


def read_manifest(out: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(out.glob("manifest*.jsonl")):
        lines.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return lines


def latest(out: Path) -> dict[str, dict[str, Any]]:
    return {r["item_id"]: r for r in read_manifest(out)}


def png(width: int = 4, height: int = 3, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A small valid RGB PNG of one colour."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def item_id(n: int) -> str:
    """A stable 20-hex-digit id for hand-written records."""
    return hashlib.sha256(str(n).encode()).hexdigest()[:20]
