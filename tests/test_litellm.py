"""runner through a real LiteLLM proxy on loopback, in front of a fake Gemini API (issue 14, `api_format`).

The proxy comes from `.ci/litellm-setup` (a venv of its own) or env RUNNER_LITELLM; without it these
tests skip, unless RUNNER_REQUIRE_LITELLM=1 (CI), where they fail. One proxy serves the whole module:
it takes 6-15 s to start (more on a loaded machine). An audit hook loaded into the proxy refuses and logs any network use
that is not loopback, so the tests also prove LiteLLM made no outbound call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ROOT, latest, run_cli, write_spec
from .fake_gemini import API_KEY as GEMINI_KEY
from .fake_gemini import FakeGemini, Seen, png

# One worker runs the whole module (with --dist loadgroup): a proxy per worker would cost its start-up each.
pytestmark = pytest.mark.xdist_group("litellm")

MODELS = {"nanobanana_pro": "gemini-3-pro-image-preview", "nanobanana": "gemini-2.5-flash-image"}
START_TIMEOUT_S = 180.0  # start-up takes ~12 s idle; a loaded 2-core CI machine can take several times that

# Loaded into the proxy's Python through PYTHONPATH. Audit events see every socket connect and name
# lookup CPython makes; anything not loopback is logged and refused, so it can neither leak nor hang.
NO_EGRESS = """
import os, sys

_LOG = os.environ["RUNNER_EGRESS_LOG"]

def _hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host is None or str(host) in ("localhost", "::1") or str(host).startswith("127."):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {event} {host}\\n")
    raise PermissionError(f"test sandbox: no network beyond loopback ({event} {host})")

sys.addaudithook(_hook)
with open(_LOG + ".armed", "a") as f:
    f.write(f"{os.getpid()}\\n")
"""


@dataclass
class Proxy:
    url: str  # http://127.0.0.1:PORT
    key: str  # the proxy's master key: what runner sends as its API key
    fake: FakeGemini
    log: Path
    egress_log: Path
    hook_dir: Path
    env: dict[str, str]
    python: Path


def litellm_executable() -> Path | None:
    given = os.environ.get("RUNNER_LITELLM")
    path = Path(given) if given else ROOT / ".ci" / ".litellm-venv" / "bin" / "litellm"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_config(api_base: str, master_key: str) -> dict[str, Any]:
    deployments = [
        {
            "model_name": name,
            "litellm_params": {"model": f"gemini/{model}", "api_base": api_base, "api_key": GEMINI_KEY},
        }
        for name, model in MODELS.items()
    ]
    # The proxy's own default is 2 retries of a 429 (it waits out retryDelay itself), which would hide
    # the 429 from runner: test (c) needs the proxy to pass it on, as a proxy without retries does.
    return {
        "model_list": deployments,
        "general_settings": {"master_key": master_key},
        "router_settings": {"num_retries": 0},
    }


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll the proxy's readiness endpoint until it answers healthy, the process dies, or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"litellm exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                answer = client.get(f"{url}/health/readiness")
                if answer.status_code == 200 and answer.json().get("status") == "healthy":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)  # a poll interval, not a guess at how long start-up takes
    raise RuntimeError(f"litellm not ready after {START_TIMEOUT_S:.0f}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(20)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    exe = litellm_executable()
    if exe is None:
        why = "no LiteLLM proxy: run .ci/litellm-setup or set RUNNER_LITELLM to a litellm executable"
        if os.environ.get("RUNNER_REQUIRE_LITELLM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    work = tmp_path_factory.mktemp("litellm")
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(NO_EGRESS)
    egress_log = work / "egress.log"
    master_key = "sk-litellm-proxy-5e2b90"
    env = {
        "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(hook_dir),
        "RUNNER_EGRESS_LOG": str(egress_log),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the price table from the package, not downloaded
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    }
    fake = FakeGemini()
    fake.start()
    config = work / "config.yaml"
    config.write_text(json.dumps(proxy_config(fake.api_base, master_key), indent=1))  # JSON is YAML
    log = work / "proxy.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # a free port can be taken by another process before the proxy binds it
            url = f"http://127.0.0.1:{free_port()}"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                    env=env,
                    start_new_session=True,
                )
            try:
                wait_ready(process, url, log)
                break
            except RuntimeError:
                stop(process)
                if "address already in use" not in log.read_text().lower():
                    raise
        else:
            raise RuntimeError(f"litellm found no free port:\n{log.read_text()[-4000:]}")
        yield Proxy(url, master_key, fake, log, egress_log, hook_dir, env, exe.parent / "python")
    finally:
        if process is not None:
            stop(process)
        fake.stop()
    outbound = egress_log.read_text() if egress_log.exists() else ""
    assert not outbound, f"the LiteLLM proxy tried to reach beyond loopback:\n{outbound}"


def chat(proxy: Proxy, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(timeout=60, trust_env=False) as client:
        return client.post(
            f"{proxy.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {proxy.key}"}
        )


def only_generation(fake: FakeGemini) -> Seen:
    calls = fake.generations()
    assert len(calls) == 1, [(c.path, c.status, c.raw[:300]) for c in calls]
    return calls[0]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


MUG = png(24, 16, b"a mug, the reference image")


# (a) The request shape of `api_format: openai-compatible`, sent by hand.


def test_openai_compatible_shape_reaches_gemini(proxy: Proxy) -> None:
    proxy.fake.clear()
    body = {
        "model": "nanobanana_pro",
        "stream": False,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Put the mug from image 1 on a beach"},
                    {"type": "image_url", "image_url": {"url": data_uri(MUG)}},
                ],
            }
        ],
        "image_config": {"aspect_ratio": "16:9", "image_size": "2K"},
        "modalities": ["image", "text"],
        "seed": 1234,
    }
    answer = chat(proxy, body)
    assert answer.status_code == 200, answer.text

    seen = only_generation(proxy.fake)
    assert seen.path == "/v1beta/models/gemini-3-pro-image-preview:generateContent"
    assert seen.headers["x-goog-api-key"] == GEMINI_KEY
    assert seen.image_config == {"aspectRatio": "16:9", "imageSize": "2K"}
    assert seen.seed == 1234
    assert "IMAGE" in seen.generation_config["responseModalities"]
    assert seen.part_kinds == ["text", "image"]
    assert seen.text == "Put the mug from image 1 on a beach"
    assert seen.images == [("image/png", MUG)]
    # Nothing of the OpenAI shape is left over at the top level, where Google refuses unknown names.
    assert not {"model", "messages", "image_config", "modalities", "seed", "stream"} & set(seen.body)

    message = answer.json()["choices"][0]["message"]
    assert seen.image is not None
    assert message["images"][0]["image_url"]["url"] == data_uri(seen.image)
    assert "data:image" not in (message.get("content") or "")  # LiteLLM leaves the Markdown shape to others


def test_text_only_prompt_and_sampling_params(proxy: Proxy) -> None:
    proxy.fake.clear()
    body = {
        "model": "nanobanana",
        "stream": False,
        "messages": [{"role": "user", "content": "A red fox in fresh snow"}],
        "image_config": {"aspect_ratio": "4:3"},
        "modalities": ["image", "text"],
        "seed": 7,
        "temperature": 0.5,
        "top_p": 0.9,
    }
    answer = chat(proxy, body)
    assert answer.status_code == 200, answer.text
    seen = only_generation(proxy.fake)
    assert seen.model == "gemini-2.5-flash-image"
    assert seen.part_kinds == ["text"]
    assert seen.text == "A red fox in fresh snow"
    assert seen.image_config == {"aspectRatio": "4:3"}
    config = seen.generation_config
    assert (seen.seed, config.get("temperature"), config.get("topP", config.get("top_p"))) == (7, 0.5, 0.9)


def test_literal_extra_body_is_an_unknown_field_to_gemini(proxy: Proxy) -> None:
    """The gateway's documented `extra_body` shape does not work through LiteLLM: recorded as observed.

    LiteLLM 1.108 unpacks `extra_body` into the upstream body, as the OpenAI SDK would, so Google
    gets a top-level `google` field it does not know (a 400, as from the real API) and no image config.
    """
    proxy.fake.clear()
    config = {"aspect_ratio": "16:9", "image_size": "2K"}
    body = {
        "model": "nanobanana_pro",
        "stream": False,
        "messages": [{"role": "user", "content": "A lighthouse at dusk"}],
        "extra_body": {"google": {"image_config": config}},
    }
    answer = chat(proxy, body)
    seen = only_generation(proxy.fake)
    assert seen.body["google"] == {"image_config": config}
    assert "extra_body" not in seen.body
    assert seen.image_config == {}
    assert seen.status == 400
    assert answer.status_code == 400
    assert 'Unknown name \\"google\\"' in answer.json()["error"]["message"]


def test_proxy_made_no_outbound_attempt(proxy: Proxy, tmp_path: Path) -> None:
    armed = Path(f"{proxy.egress_log}.armed")
    assert armed.exists(), "the audit hook was not loaded into the proxy: the egress check proves nothing"
    assert not proxy.egress_log.exists(), proxy.egress_log.read_text()
    # The hook catches an attempt: the proxy's own Python, the same environment, a name to look up.
    env = {**proxy.env, "RUNNER_EGRESS_LOG": str(tmp_path / "probe.log")}
    probe = (
        "import socket\ntry:\n    socket.getaddrinfo('pypi.org', 443)\nexcept PermissionError:\n    print('refused')"
    )
    result = subprocess.run([str(proxy.python), "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "refused", result.stderr
    assert "getaddrinfo pypi.org" in (tmp_path / "probe.log").read_text()


# (b) The real thing: runner with `api_format: openai-compatible`.


def test_runner_job_through_litellm(proxy: Proxy, tmp_path: Path) -> None:
    proxy.fake.clear()
    (tmp_path / "mug.png").write_bytes(MUG)
    prompts = [
        {"id": "mug", "prompt": "Put the mug from image 1 on a beach", "images": ["mug.png"]},
        {
            "id": "fox",
            "prompt": "A red fox in fresh snow",
            "model": "nanobanana",
            "image_configs": [{"aspect_ratio": "4:3"}],
        },
    ]
    spec = write_spec(
        tmp_path,
        base_url=f"{proxy.url}/v1",
        api_format="openai-compatible",
        image_configs=[{"aspect_ratio": "16:9", "image_size": "2K"}, {"aspect_ratio": "1:1", "image_size": "1K"}],
        repeats=2,
        params={"seed": 1234},
        prompts=prompts,
    )
    result = run_cli("run", str(spec), "--no-progress", key=proxy.key)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "out"
    records = latest(out)
    assert len(records) == 6  # mug: 2 configs x 2 repeats; fox: 1 config x 2 repeats
    calls = proxy.fake.generations()
    assert len(calls) == 6 and all(c.status == 200 for c in calls), [(c.status, c.raw[:200]) for c in calls]

    by_request = {}
    for call in calls:
        config = call.image_config
        by_request[(call.text, config.get("aspectRatio"), config.get("imageSize"), call.seed)] = call
    assert len(by_request) == 6, "two items sent the same request"
    mug_sha = hashlib.sha256(MUG).hexdigest()
    for rec in records.values():
        assert rec["status"] == "ok", rec
        seed = 1234 + rec["repeat"]
        assert rec["params"] == {"seed": seed}
        cfg = rec["image_config"]
        call = by_request.pop((rec["prompt"], cfg["aspect_ratio"], cfg.get("image_size"), seed))
        assert call.model == MODELS[rec["model"]]
        if rec["prompt_id"] == "mug":
            assert call.part_kinds == ["text", "image"]
            assert call.images == [("image/png", MUG)]
            assert [i["sha256"] for i in rec["inputs"]] == [mug_sha]
        else:
            assert call.part_kinds == ["text"]
            assert not rec.get("inputs")
        # The saved image is the one the fake made for exactly this request.
        assert call.image is not None
        saved = (out / rec["image_path"]).read_bytes()
        assert saved == call.image
        assert rec["sha256"] == hashlib.sha256(call.image).hexdigest()
    assert proxy.key not in json.dumps(records) + result.stdout + result.stderr


# (c) Google's 429 as LiteLLM relays it: no Retry-After, the retryDelay inside error.message.


def test_rate_limit_retry_delay_through_litellm(proxy: Proxy, tmp_path: Path) -> None:
    proxy.fake.clear()
    proxy.fake.rate_limit_next(1, retry_delay="1s")
    spec = write_spec(
        tmp_path,
        base_url=f"{proxy.url}/v1",
        api_format="openai-compatible",
        prompts=["A lighthouse at dusk"],
        image_configs=[{"aspect_ratio": "3:2"}],
        max_attempts=3,
    )
    result = run_cli("run", str(spec), "--no-progress", key=proxy.key)
    assert result.returncode == 0, result.stderr

    (rec,) = latest(tmp_path / "out").values()
    assert rec["status"] == "ok"
    assert rec["attempts"] == 2
    assert rec["retried"] == {"rate_limited": 1}
    first, second = proxy.fake.generations()
    assert (first.status, second.status) == (429, 200)
    # The spec's own backoff is at most 0.05 s: only the retryDelay explains a wait of about 1 s.
    assert 0.95 <= second.at - first.at < 6.0


# (d) An edit chain through the real proxy: each edit carries exactly the image its parent got.


def test_an_edit_chain_through_litellm(proxy: Proxy, tmp_path: Path) -> None:
    proxy.fake.clear()
    prompts = [
        {"id": "base", "template": "a studio photo of a {product}", "vars": {"product": ["kettle", "vase"]}},
        {"id": "room", "template": "put the {product} on a {table}", "images": ["@base"], "vars": {"table": ["oak", "glass"]}},
    ]  # fmt: skip
    spec = write_spec(tmp_path, base_url=f"{proxy.url}/v1", api_format="openai-compatible", prompts=prompts)
    result = run_cli("run", str(spec), "--no-progress", key=proxy.key)
    assert result.returncode == 0, result.stderr
    records = latest(tmp_path / "out")
    assert len(records) == 2 + 4
    made = {call.text: call.image for call in proxy.fake.generations()}
    for rec in records.values():
        if rec["prompt_id"] != "room":
            continue
        (link,) = rec["inputs"]
        parent = records[link["item_id"]]
        (call,) = [c for c in proxy.fake.generations() if c.text == rec["prompt"]]
        assert call.images == [("image/png", made[parent["prompt"]])]  # the parent's own image reached Gemini
        assert link["sha256"] == parent["sha256"] == hashlib.sha256(made[parent["prompt"]] or b"").hexdigest()
