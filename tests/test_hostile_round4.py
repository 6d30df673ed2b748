"""Hardening, round 4: hostile answers of Google's API, edit chains, export and S3 output. Each test
sets up the hostile case; each failed before its fix."""

from __future__ import annotations

import base64
import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import StartGateway, cli_env, latest, run_cli, write_spec
from .hostile import png
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


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_an_image_damaged_after_the_run_is_not_exported(tmp_path: Path, gateway: StartGateway, fmt: str) -> None:
    """An ok item whose image was overwritten after the run (its size and sha256 no longer the
    record's) is what a rerun makes again: the export leaves it out and says so, as for a missing one."""
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=["a stork", "a crane", "an ibis"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    damaged, missing, *_ = latest(out).values()
    (out / damaged["image_path"]).write_bytes(b"junk")
    (out / missing["image_path"]).unlink()
    proc = run_cli("export", str(out), "--format", fmt, "--to", str(tmp_path / "dist"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["written"] == 1
    assert result["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    card = (tmp_path / "dist" / "README.md").read_text()
    assert "corrupt image: 1" in card and "missing image: 1" in card


def test_an_export_that_cannot_be_written_is_a_clear_error_not_a_bug(tmp_path: Path, gateway: StartGateway) -> None:
    """`--to` naming a file (or a folder under one) is a usage error (2) naming it; a disk that fills
    while the export is written stops it with exit 3 saying so; neither is an internal error (70)."""
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=["a stork", "a crane", "an ibis"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("mine")
    for to in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        for fmt in ("imagefolder", "webdataset"):
            proc = run_cli("export", str(out), "--format", fmt, "--to", str(to))
            assert proc.returncode == 2, proc.stderr
            assert "--to" in proc.stderr and str(tmp_path / "afile") in proc.stderr and "internal" not in proc.stderr
    assert (tmp_path / "afile").read_text() == "mine"

    def small_disk() -> None:  # files cannot grow past 2 kB: the export fills up as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))

    env = {k: v for k, v in cli_env().items() if not k.startswith("COVERAGE_PROCESS")}
    for fmt in ("imagefolder", "webdataset"):
        dest = tmp_path / f"dist-{fmt}"
        proc = subprocess.run(
            [sys.executable, "-m", "runner", "export", str(out), "--format", fmt, "--to", str(dest)],
            capture_output=True, text=True, env=env, timeout=60, preexec_fn=small_disk, check=False,
        )  # fmt: skip
        assert proc.returncode == 3, proc.stderr
        assert "disk full" in proc.stderr and str(dest) in proc.stderr and "internal" not in proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
        assert not dest.exists(), "a refused export leaves nothing behind"


def test_a_gallery_that_cannot_be_written_is_a_clear_error_not_a_bug(tmp_path: Path, gateway: StartGateway) -> None:
    """`--html` naming a folder, or a file under a file, is a usage error (2); a full disk is exit 3."""
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=["a stork", "a crane"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("mine")
    for html in (tmp_path / "afile" / "g.html", tmp_path):
        proc = run_cli("report", str(out), "--html", str(html))
        assert proc.returncode == 2 and "--html" in proc.stderr and "internal" not in proc.stderr, proc.stderr

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))

    env = {k: v for k, v in cli_env().items() if not k.startswith("COVERAGE_PROCESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "report", str(out), "--html", str(tmp_path / "g.html"), "--no-quality"],
        capture_output=True, text=True, env=env, timeout=60, preexec_fn=small_disk, check=False,
    )  # fmt: skip
    assert proc.returncode == 3 and "disk full" in proc.stderr and "internal" not in proc.stderr, proc.stderr
    assert not (tmp_path / "g.html").exists()


def test_the_fingerprint_of_a_chained_spec_is_the_same_in_every_process(tmp_path: Path, gateway: StartGateway) -> None:
    """A child that inherits two labels: the spec's fingerprint did not depend on the process's hash
    seed (the order of a set), so the second shard of a job said the spec had changed."""
    gw = gateway()
    path = write_spec(
        tmp_path, gw.base_url, concurrency=2,
        prompts=[
            {"id": "base", "template": "a {thing} number {n}", "vars": {"thing": ["mug", "fox", "owl"], "n": [1, 2, 3, 4]}},
            {"id": "edit", "template": "make the {thing} {color}", "images": ["@base"], "vars": {"color": ["red", "blue"]}},
        ],
    )  # fmt: skip
    said = []
    for shard, seed in (("0/2", "0"), ("1/2", "1"), ("0/2", "1")):
        proc = run_cli("run", str(path), "--no-progress", "--shard", shard, timeout=60, env={"PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        said.append(proc.stderr)
    assert not [s for s in said if "spec changed" in s], said
    assert len(latest(tmp_path / "out")) == 36


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_image_data_without_base64_padding_is_read(
    tmp_path: Path, gateway: StartGateway, tamper: StartTamper, encode: Callable[[bytes], bytes]
) -> None:
    """proto3 JSON bytes may come without their `=` padding, in either alphabet: a whole image so sent
    is the paid answer it is, not invalid_response (retried: bought again)."""
    image = png(b"b")
    assert len(image) % 3 and b"=" in base64.b64encode(image)
    gw = gateway(flavor="gemini")

    def unpadded(method: str, path: str, status: int, body: bytes) -> tuple[int, bytes] | None:
        if not generate(path) or status != 200:
            return None
        answer = json.loads(body)
        for part in answer["candidates"][0]["content"]["parts"]:
            if "inlineData" in part:
                part["inlineData"] = {"mimeType": "image/png", "data": encode(image).decode().rstrip("=")}
        return status, json.dumps(answer).encode()

    proxy = tamper(gw, unpadded)
    path = write_spec(tmp_path, proxy.base_url, api_format="gemini", prompts=["a stork"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (rec,) = latest(tmp_path / "out").values()
    assert (
        rec["status"] == "ok" and rec["attempts"] == 1 and (tmp_path / "out" / rec["image_path"]).read_bytes() == image
    )


def test_a_sharded_chain_whose_spec_grew_says_no_record_is_gone(tmp_path: Path, gateway: StartGateway) -> None:
    """An edit's shard is its root's, not its own id's: the drift note of a shard counted the records
    "no longer in the spec" by the wrong shard (6 said gone, none was; or a negative number)."""
    gw = gateway()

    def spec(things: list[str]) -> Path:
        return write_spec(
            tmp_path, gw.base_url, model="nanobanana", concurrency=8,
            prompts=[
                {"id": "base", "template": "photo of {thing} number {n}", "vars": {"thing": things, "n": [1, 2, 3, 4, 5, 6]}},
                {"id": "edit", "template": "make the {thing} {color}", "images": ["@base"], "vars": {"color": ["red", "blue"]}},
            ],
        )  # fmt: skip

    path = spec(["mug", "lamp", "chair", "fox"])
    for shard in ("0/2", "1/2"):
        assert run_cli("run", str(path), "--no-progress", "--shard", shard).returncode == 0
    path = spec(["mug", "lamp", "chair", "fox", "owl"])
    for shard in ("0/2", "1/2"):
        proc = run_cli("run", str(path), "--no-progress", "--shard", shard)
        assert proc.returncode == 0, proc.stderr
        assert "spec changed" not in proc.stderr or " 0 recorded items are no longer" in proc.stderr, proc.stderr
    assert len(latest(tmp_path / "out")) == 90


def test_a_sharded_chain_adopts_every_edit_image_whose_line_was_lost(tmp_path: Path, gateway: StartGateway) -> None:
    """A kill between an edit's image and its manifest line: the next run of its shard records it from
    the image. An edit is its root's shard's, so its own id says nothing of whose it is: those whose
    id fell in another shard were bought again."""
    gw = gateway()
    path = write_spec(
        tmp_path, gw.base_url, model="nanobanana", concurrency=8,
        prompts=[
            {"id": "base", "template": "photo of {thing} number {n}", "vars": {"thing": ["mug", "fox"], "n": [1, 2, 3, 4]}},
            {"id": "edit", "template": "make the {thing} {color}", "images": ["@base"], "vars": {"color": ["red", "blue"]}},
        ],
    )  # fmt: skip
    assert run_cli("run", str(path), "--no-progress", "--shard", "0/2").returncode == 0
    out = tmp_path / "out"
    manifest = out / "manifest.shard-0-of-2.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    edits = [json.loads(line) for line in lines if json.loads(line)["prompt_id"] == "edit"]
    assert {int(r["item_id"], 16) % 2 for r in edits} == {0, 1}, "edits whose own ids fall in either shard"
    manifest.write_text("".join(line for line in lines if json.loads(line)["prompt_id"] != "edit"))
    for index in out.glob(".manifest*.idx"):
        index.unlink()
    before = gw.stats()["requests"]
    proc = run_cli("run", str(path), "--no-progress", "--shard", "0/2")
    assert proc.returncode == 0, proc.stderr
    assert gw.stats()["requests"] == before, "nothing bought twice"
    recs = latest(out)
    assert all(recs[r["item_id"]].get("recovered") for r in edits)
