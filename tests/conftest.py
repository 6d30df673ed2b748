"""Shared fixtures: a mock gateway on a loopback port, spec files, and the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import cli
from runner.mock import MockConfig, MockGateway
from runner.record import ErrorRec, ImageFile, Record, make_record

from .hostile import HostileServer
from .tamper import Refuse, Tamper, TamperProxy

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


BUCKET = "runner-test"


@dataclass
class S3Requests:
    """The requests a moto server on loopback received (from its werkzeug log), as (method, path?query)."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r'"(?:\x1b\[[\d;]*m)*([A-Z]+) (\S+) HTTP', record.getMessage())
        if m:
            self.seen.append((m.group(1), m.group(2)))

    def gets(self, contains: str = "") -> list[str]:
        """Object reads (GET of a key, not a listing)."""
        return [p for method, p in self.seen if method == "GET" and "list-type" not in p and contains in p]

    def lists(self) -> list[str]:
        return [p for method, p in self.seen if method == "GET" and "list-type" in p]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real S3-compatible server (moto) on a loopback port with an empty bucket BUCKET; the
    environment points the CLI (and its subprocesses) at it. Yields an s3fs filesystem."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its state per process: an earlier test's bucket would still be there
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b""), timeout=10
    ).close()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the CLI subprocesses inherit these
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", use_listings_cache=False)
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()


@pytest.fixture
def s3_requests(s3: Any) -> Iterator[S3Requests]:
    """What the moto server of `s3` is asked, from now on (its werkzeug request log)."""
    seen = S3Requests()
    handler = logging.Handler()
    handler.emit = seen.emit  # type: ignore[method-assign]
    logger = logging.getLogger("werkzeug")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


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


def manifest_line(
    out: Path | None,
    n: int | str,
    *,
    status: str | None = None,
    error: dict[str, Any] | None = None,
    prompt: str = "A red fox in fresh snow",
    prompt_id: str = "fox",
    model: str = "nanobanana_pro",
    config: dict[str, Any] | tuple[str, str | None] = ("16:9", "2K"),
    vars_: dict[str, str] | None = None,
    repeat: int = 0,
    attempts: int = 1,
    retried: dict[str, int] | None = None,
    cost: float | None = None,
    latency: float | None = 10.0,
    at: str = "2026-11-25T08:00:00.000+00:00",
    run: str = "run1",
    image: bytes | None = None,
    images: list[ImageFile] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
) -> Record:
    """The one factory of manifest lines for tests, through runner's own make_record. An ok line
    (no `error`) writes its image under `out` where the writer would (`image`, or a small PNG of
    its own colour), unless `images` gives the image entries as they are (no files)."""
    iid = item_id(n) if isinstance(n, int) else n
    if isinstance(config, tuple):
        config = {"aspect_ratio": config[0], "image_size": config[1]}
    fields: dict[str, Any] = {
        "item_id": iid, "prompt_id": prompt_id, "prompt": prompt, "model": model,
        "image_config": {"aspect_ratio": config.get("aspect_ratio"), "image_size": config.get("image_size")},
        "repeat": repeat, "vars": vars_,
    }  # fmt: skip
    if inputs is not None:
        fields["inputs"] = inputs
    if params is not None:
        fields["params"] = params
    failed = error is not None or status == "failed"
    if not failed and images is None:
        assert out is not None, "an ok line writes its image: give `out`"
        data = image if image is not None else png(rgb=tuple(hashlib.sha256(iid.encode()).digest()[:3]))  # type: ignore[arg-type]
        rel = f"images/{iid[:2]}/{iid}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        width, height = struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" else (None, None)
        images = [{"image_path": rel, "mime": "image/png", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                   "mtime_ns": (out / rel).stat().st_mtime_ns, "width": width, "height": height}]  # fmt: skip
    err: ErrorRec | None = None
    if failed:
        err = error or {"kind": "server_error", "status": 503, "message": "overloaded"}  # type: ignore[assignment]
    return make_record(
        fields, status="failed" if failed else "ok", attempts=attempts, request_id=f"chatcmpl-{n}",
        usage=usage, cost_usd=cost if cost is not None else (0.0 if failed else 0.134), latency_s=latency,
        elapsed_s=None if latency is None else latency + 1, finished_at=at, run_id=run, images=images or None,
        error=err, retried=retried,
    )  # fmt: skip


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tamper() -> Iterator[Callable[..., TamperProxy]]:
    """Put a TamperProxy in front of a gemini-flavoured mock; all are stopped after the test."""
    started: list[TamperProxy] = []

    def start(gw: MockGateway, rewrite: Tamper, refuse: Refuse | None = None) -> TamperProxy:
        proxy = TamperProxy(gw.base_url.removesuffix("/v1beta"), rewrite, refuse)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
