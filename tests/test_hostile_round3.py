"""Hardening, round 3 (issue 23): paid answers never thrown away, lies about images and errors caught,
the environment's settings read right. Each test sets up the hostile case; each failed before its fix."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import os
import resource
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.gateway.answer import Success, parse_completion
from runner.imageinfo import is_whole_image
from runner.output.files import output_error
from runner.output.local import LocalStore
from runner.policy import classify_error
from runner.pricing import usd
from runner.safety import safe_json

from .conftest import MockGateway, StartGateway, cli_env, latest, manifest_line, run_cli, write_spec
from .hostile import HUGE_USAGE, POLYGLOT, HostileServer, completion, image_md, png
from .test_hostile_gateway import GOOD, bad_prompt, run_against, strict_records

INT64 = (-(2**63), 2**63 - 1)


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


# 1. the open-file limit ----------------------------------------------------------------------------------------


def run_limited(path: Path, soft: int, hard: int | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`runner run` in a child whose RLIMIT_NOFILE is (soft, hard); hard None: left as it is."""

    def limit() -> None:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard)
        )

    # Coverage keeps files open in the child too: this process goes unmeasured, as the full-disk one does.
    env = {k: v for k, v in cli_env().items() if not k.startswith("COVERAGE_PROCESS")}
    return subprocess.run(
        [sys.executable, "-m", "runner", "run", str(path), "--no-progress", *args],
        capture_output=True, text=True, env=env, timeout=120, preexec_fn=limit, check=False,
    )  # fmt: skip


def assert_bought_once(gw: MockGateway, out: Path, n: int) -> None:
    recs = latest(out)
    assert len(recs) == n and all(r["status"] == "ok" for r in recs.values())
    stats = gw.stats()
    assert stats["requests"] == stats["generations"] == n, "every answer bought once, none thrown away"


@pytest.mark.parametrize("hard", [None, 64])
def test_a_soft_limit_of_64_open_files_at_concurrency_200_loses_no_paid_answer(
    tmp_path: Path, gateway: StartGateway, hard: int | None
) -> None:
    gw = gateway(latency_s=0.3)  # answers in flight long enough for 200 connections to be open at once
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(300)], concurrency=200, timeout_s=60)
    proc = run_limited(path, 64, hard)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "too many open files" in line]
    if hard is None:  # the soft limit is raised to the hard one: nothing to say
        assert said == [], said
    else:  # it cannot be: the concurrency is lowered, said once, naming the cause
        assert len(said) == 1 and "ulimit -n is 64" in said[0] and "concurrency 200 needs about" in said[0], said
    assert_bought_once(gw, tmp_path / "out", 300)
    again = run_limited(path, 64, hard)
    assert again.returncode == 0 and gw.stats()["requests"] == 300, "a rerun buys nothing twice"


def test_a_limit_too_low_to_run_at_all_is_a_usage_error_before_anything_is_sent(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(10)], concurrency=200)
    proc = run_limited(path, 12, 12)
    assert proc.returncode == 2 and "ulimit -n is 12 (the hard limit too), too few to run at all" in proc.stderr
    assert "Traceback" not in proc.stderr and gw.stats()["requests"] == 0


def _failing_saves(monkeypatch: pytest.MonkeyPatch, err: int, fail: Callable[[int], bool]) -> list[int]:
    """LocalStore.save_image fails with OSError `err` on the calls (numbered from 0) where fail(n)."""
    calls: list[int] = []
    real = LocalStore.save_image

    def save_image(self: LocalStore, rel: str, data: bytes) -> tuple[str, int | None]:
        n = len(calls)
        calls.append(n)
        if fail(n):
            raise output_error(OSError(err, os.strerror(err), rel), self.display)
        return real(self, rel, data)

    monkeypatch.setattr(LocalStore, "save_image", save_image)
    return calls


def test_an_answer_that_cannot_be_saved_for_want_of_a_descriptor_is_held_and_saved(
    tmp_path: Path, gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway()
    _failing_saves(monkeypatch, errno.EMFILE, lambda n: n < 6)  # the first six tries fail: EMFILE
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(8)], concurrency=4)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "too many open files: ulimit -n is" in proc.stderr and "holding" in proc.stderr, proc.stderr
    assert_bought_once(gw, tmp_path / "out", 8)


# 8. money words ------------------------------------------------------------------------------------------------


def test_answers_paid_while_the_disk_was_full_are_counted(
    tmp_path: Path, gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway(latency_s=0.05)
    _failing_saves(monkeypatch, errno.ENOSPC, lambda n: n >= 5)  # the disk fills after five images
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(20)], concurrency=4)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "cannot write to output dir" in proc.stderr, proc.stderr
    saved = [r for r in latest(tmp_path / "out").values() if r["status"] == "ok"]
    paid = gw.stats()["generations"]
    unsaved = paid - len(saved)
    assert len(saved) == 5 and unsaved >= 1
    assert f"{unsaved} answers paid but not saved: disk full ({usd(unsaved * 0.134)}" in proc.stderr, proc.stderr
    assert f"{usd(paid * 0.134)} spent this run" in proc.stderr, proc.stderr
    monkeypatch.undo()
    assert run_cli("run", str(path), "--no-progress").returncode == 0  # with room again, the job finishes
    assert len(latest(tmp_path / "out")) == 20


def test_images_adopted_from_disk_are_not_spend_of_this_run(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    (tmp_path / "out" / "manifest.jsonl").write_bytes(b"")  # a kill between the images and their lines
    (tmp_path / "out" / ".manifest.jsonl.idx").unlink()
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0 and mock.stats()["requests"] == 3, proc.stderr
    assert f"0 requests, {usd(0)} spent this run ({usd(0.402)} in all)" in proc.stderr, proc.stderr
    assert "3 items recovered from whole images on disk" in proc.stderr


def test_fifteen_images_an_answer_overshoot_the_budget_by_one_answer_at_most(
    tmp_path: Path, hostile: HostileServer
) -> None:
    per_answer = 15 * 0.134
    prompts = [f"{bad_prompt('images15')} {i}" for i in range(20)]
    path = write_spec(tmp_path, hostile.base_url, prompts=prompts, concurrency=8, max_cost_usd=1)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "budget reached" in proc.stderr, proc.stderr[-3000:]
    paid = sum(hostile.stats()["paid"].values())
    records = strict_records(tmp_path / "out")
    assert paid == len(records) == 1, "the first answer goes alone; once it shows 15 images, none fits"
    assert sum(r["cost_usd"] for r in records) == pytest.approx(per_answer)


# 4. TLS: CA settings that cannot work, a certificate nobody trusts ---------------------------------------------


def make_ca(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (its certificate as ca.pem) and a server context for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            b = b.add_extension(usage, critical=True)
        else:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            b = b.add_extension(san, critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runner test CA")])
    ca_cert = cert("runner test CA", ca_key, ca_name, ca_key, True)
    leaf = cert("127.0.0.1", key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "server.pem").write_bytes(leaf.public_bytes(pem) + ca_cert.public_bytes(pem))
    (folder / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    return folder / "ca.pem", context


@pytest.fixture
def tls_gateway(tmp_path: Path) -> Iterator[tuple[HostileServer, Path]]:
    ca, context = make_ca(tmp_path)
    server = HostileServer(tls=context)
    server.start()
    yield server, ca
    server.stop()


CA_VARS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


def run_tls(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`runner run` with exactly these CA variables (none of the machine's own leak in)."""
    saved = {k: os.environ.pop(k) for k in CA_VARS if k in os.environ}
    try:
        return run_cli("run", str(path), "--no-progress", env=env)
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "SSL_CERT_DIR"])
@pytest.mark.parametrize("problem", ["missing", "not pem"])
def test_a_ca_setting_that_names_nothing_usable_is_a_usage_error(
    tmp_path: Path, hostile: HostileServer, variable: str, problem: str
) -> None:
    bad = tmp_path / "nonexistent.pem"
    if problem == "not pem":
        bad = tmp_path / "notes.txt"
        bad.write_text("this is not a certificate\n")
    path = write_spec(tmp_path, "https://127.0.0.1:9/v1")
    proc = run_tls(path, **{variable: str(bad)})
    assert proc.returncode == 2, proc.stderr
    assert f"{variable}={bad}" in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists(), "nothing done before the check"


@pytest.mark.parametrize("transport", ["default", "httpx"])
def test_a_self_signed_gateway_stops_the_run_saying_how_to_trust_its_ca(
    tmp_path: Path, tls_gateway: tuple[HostileServer, Path], transport: str
) -> None:
    server, _ = tls_gateway
    path = write_spec(tmp_path, server.base_url, prompts=[f"p{i}" for i in range(20)], concurrency=2, max_attempts=5)
    proc = run_tls(path, **({"RUNNER_HTTP_TRANSPORT": "httpx"} if transport == "httpx" else {}))
    assert proc.returncode == 3, proc.stderr
    assert "could not be verified" in proc.stderr and "SSL_CERT_FILE" in proc.stderr, proc.stderr
    assert "wait a while" not in proc.stderr
    records = strict_records(tmp_path / "out")
    assert 1 <= len(records) <= 2 and all(r["attempts"] == 1 for r in records), "not retried, no new item started"
    assert {r["error"]["kind"] for r in records} == {"certificate"}


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "SSL_CERT_DIR"])
def test_a_private_ca_is_trusted_through_the_environment(
    tmp_path: Path, tls_gateway: tuple[HostileServer, Path], variable: str
) -> None:
    server, ca = tls_gateway
    value = str(ca)
    if variable == "SSL_CERT_DIR":  # a folder of hashed PEM files, as `openssl rehash` makes it
        folder = tmp_path / "certs"
        folder.mkdir()
        subject_hash = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(ca)], capture_output=True, text=True, check=False
        )
        if subject_hash.returncode != 0:
            pytest.skip("needs the openssl command to name the hashed file")
        (folder / f"{subject_hash.stdout.strip()}.0").write_bytes(ca.read_bytes())
        value = str(folder)
    path = write_spec(tmp_path, server.base_url, prompts=GOOD)
    proc = run_tls(path, **{variable: value})
    assert proc.returncode == 0, proc.stderr
    assert sum(server.stats()["paid"].values()) == len(GOOD)


# 5. proxies ----------------------------------------------------------------------------------------------------


NO_PROXIES = {k: "" for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")}


def test_mock_never_goes_through_a_proxy(tmp_path: Path, hostile: HostileServer) -> None:
    proxy = f"http://127.0.0.1:{hostile.port}"  # a "proxy" that would answer, and counts what reaches it
    path = write_spec(tmp_path, prompts=["a", "b"])
    env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy, "NO_PROXY": ""}
    proc = run_cli("run", str(path), "--no-progress", "--mock", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hostile.stats()["requests"] == {}, "loopback never goes through a proxy"


def test_all_proxy_is_honoured(tmp_path: Path, hostile: HostileServer) -> None:
    path = write_spec(tmp_path, "http://gateway.invalid/v1", prompts=GOOD)
    env = {**NO_PROXIES, "ALL_PROXY": f"127.0.0.1:{hostile.port}"}  # no scheme: http://, as curl reads it
    proc = run_cli("run", str(path), "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sum(hostile.stats()["paid"].values()) == len(GOOD)


@pytest.mark.parametrize(
    "value", ["socks5://127.0.0.1:1080", "http://proxy.example:port", "http://user:hunter2@:3128", "http://"]
)
def test_an_invalid_proxy_url_is_a_usage_error_naming_the_variable(tmp_path: Path, value: str) -> None:
    path = write_spec(tmp_path, "http://gateway.invalid/v1")
    proc = run_cli("run", str(path), "--no-progress", env={**NO_PROXIES, "HTTP_PROXY": value})
    assert proc.returncode == 2, proc.stderr
    assert "HTTP_PROXY=" in proc.stderr and "hunter2" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# 7. clock steps ------------------------------------------------------------------------------------------------


def _stepped_run(out: Path, monotonic: bool) -> None:
    """A 200-second run of 20 items (10 s each) whose wall clock was stepped back an hour halfway."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = datetime.datetime(2026, 11, 25, 8, 0, tzinfo=datetime.UTC)
    lines = []
    for i in range(20):
        since = 10.0 * (i + 1)
        wall = t0 + datetime.timedelta(seconds=since - (3600 if i >= 10 else 0))
        rec = manifest_line(out, i, prompt=f"p{i}", latency=9.0, run="r1", at=wall.isoformat(timespec="milliseconds"))
        rec = {**rec, "elapsed_s": 10.0}
        if monotonic:
            rec["since_start_s"] = since
        lines.append(json.dumps(rec) + "\n")
    (out / "manifest.jsonl").write_text("".join(lines))


@pytest.mark.parametrize("monotonic", [True, False])
def test_a_wall_clock_stepped_back_mid_run_never_makes_a_rate(tmp_path: Path, monotonic: bool) -> None:
    out = tmp_path / "out"
    _stepped_run(out, monotonic)
    proc = run_cli("report", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    if monotonic:  # durations from the monotonic clock: 20 images in 200 s
        assert summary["throughput_per_hour"] == pytest.approx(20 / 200 * 3600)
        assert summary["busy_s"] == pytest.approx(200)
    else:  # older lines, wall times only, and they went backwards: no rate rather than a wrong one
        assert summary["throughput_per_hour"] is None


def test_a_run_records_how_long_after_its_start_each_item_finished(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    recs = list(latest(tmp_path / "out").values())
    assert all(isinstance(r["since_start_s"], float) and 0 <= r["since_start_s"] < 60 for r in recs)
    assert all(r["since_start_s"] >= r["elapsed_s"] for r in recs)


# 9. smaller: the model that answered, a name with a line break, odd prompts ----------------------------------


def test_the_model_an_answer_names_is_recorded_and_a_different_one_warned_once(
    tmp_path: Path, hostile: HostileServer
) -> None:
    markers = {"other_model": None, "google_name": None}
    prompts = [*GOOD, *(f"{bad_prompt(m)} {i}" for m in markers for i in range(3))]
    path = write_spec(tmp_path, hostile.base_url, prompts=prompts)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "gemini-2.5-flash-image" in line]
    assert len(warned) == 1 and "nanobanana_pro" in warned[0], proc.stderr
    assert "gemini-3-pro-image-preview" not in proc.stderr, "Google's own name for the model asked is that model"
    served = {r["prompt"].split(" ")[3]: r["served_model"] for r in strict_records(tmp_path / "out")}
    assert served["[hostile:other_model]"] == "gemini-2.5-flash-image"
    assert served["[hostile:google_name]"] == "models/gemini-3-pro-image-preview"


def test_a_spec_name_with_a_line_break_never_reaches_the_terminal(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, name="demo\nall good, 0 failed\x1b[2J")
    for command in ("run", "estimate"):
        proc = run_cli(command, str(path))
        assert proc.returncode == 2 and "name: must be one line" in proc.stderr, proc.stderr
        assert "\n" not in proc.stderr.rstrip("\n") and "\x1b" not in proc.stderr
    assert mock.stats()["requests"] == 0


def test_nul_bytes_and_megabyte_prompts_are_warned_once_with_the_count(tmp_path: Path, mock: MockGateway) -> None:
    (tmp_path / "prompts.txt").write_bytes(b"a cat\nnul \x00 inside\n" + b"x" * (1 << 20) + b"\n")
    path = write_spec(tmp_path, mock.base_url, prompts=[], prompt_files=["prompts.txt"], repeats=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, proc.stderr
    assert "2 item(s) have a prompt with a NUL byte" in warnings[0]
    assert "2 item(s) have a prompt over 100,000 characters (the longest 1,048,576)" in warnings[1]
    assert mock.stats()["requests"] == 6, "warned, still sent"
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert not any("NUL" in w for w in est["warnings"]), "only what remains to be sent is warned about"


def test_batch_answers_the_disk_could_not_hold_are_downloaded_again_not_bought(
    tmp_path: Path, gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=0.15)
    _failing_saves(monkeypatch, errno.ENOSPC, lambda n: n >= 2)  # the disk fills after two images
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(4)], api_format="gemini", mode="batch",
                      batch={"max_requests": 4, "poll_s": 0.05})  # fmt: skip
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "answers paid but not saved: disk full" in proc.stderr and "a rerun downloads them again" in proc.stderr
    assert "a rerun buys them again" not in proc.stderr
    monkeypatch.undo()
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert len(latest(tmp_path / "out")) == 4 and gw.stats()["google"]["batches_created"] == 1
