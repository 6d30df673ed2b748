"""Shared fixtures: a mock gateway on a loopback port, spec files, and the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    *args: str, key: str | None = KEY, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m runner ARGS` as a user would, and capture what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=cli_env(key, **(env or {})),
        timeout=timeout,
        check=False,
    )


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
