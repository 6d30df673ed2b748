"""The mock gateway over real loopback HTTP: images, validation, every fault kind, limits and stats."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from runner.mockimages import PNG_SIGNATURE, pillow_available
from runner.mockserver import FAULT_KINDS, MockConfig, MockGateway
from runner.models import pixel_size

AUTH = {"Authorization": "Bearer sk-test"}
DATA_URI = re.compile(r"!\[image\]\(data:image/(\w+);base64,([A-Za-z0-9+/=]*)\)")


@pytest.fixture
def gw() -> Iterator[MockGateway]:
    with MockGateway() as gateway:
        yield gateway


def client(gateway: MockGateway, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, headers=AUTH, timeout=kw.pop("timeout", 10), **kw)


def post(c: httpx.Client, prompt: str = "a cat", model: str = "nanobanana_pro", **fields: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "stream": False, "messages": [{"role": "user", "content": prompt}]}
    if "image_config" in fields:
        body["extra_body"] = {"google": {"image_config": fields.pop("image_config")}}
    body.update(fields)
    return c.post("/chat/completions", json=body)


def images(resp: httpx.Response) -> list[tuple[str, bytes]]:
    content = resp.json()["choices"][0]["message"]["content"]
    return [(mime, base64.b64decode(data)) for mime, data in DATA_URI.findall(content)]


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    """Chunk type -> data (IDATs joined), checking every CRC on the way."""
    assert data.startswith(PNG_SIGNATURE)
    chunks: dict[bytes, bytes] = {}
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert kind == b"IEND"
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    chunks = png_chunks(data)
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def raw_exchange(gateway: MockGateway, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_a_valid_request_gets_a_png_of_the_model_size_divided_by_the_scale(gw: MockGateway) -> None:
    with client(gw) as c:
        resp = post(c, image_config={"aspect_ratio": "16:9", "image_size": "2K"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert re.fullmatch(r"chatcmpl-\d{23}[A-Za-z0-9]{8}", body["id"])
    assert body["object"] == "chat.completion" and body["model"] == "nanobanana_pro"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert 1120 + 100 <= usage["completion_tokens"] <= 1120 + 300
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    [(mime, data)] = images(resp)
    width, height = pixel_size("nanobanana_pro", "16:9", "2K")
    assert mime == "png" and png_size(data) == (width // 8, height // 8)


def test_same_request_same_bytes_and_different_requests_differ(gw: MockGateway) -> None:
    with client(gw) as c:
        first, again = images(post(c, "a fox")), images(post(c, "a fox"))
        other = images(post(c, "a fox in snow"))
        square = images(post(c, "a fox", image_config={"aspect_ratio": "1:1"}))
        flash = images(post(c, "a fox", model="nanobanana", image_config={"aspect_ratio": "16:9"}))
    assert first == again
    assert other[0][1] != first[0][1]
    assert square == first  # 1:1 is the default ratio
    assert png_size(flash[0][1]) == (1344 // 8, 768 // 8)


def test_auth_is_required_and_the_key_never_echoed() -> None:
    with MockGateway(MockConfig(api_key="sk-right-key")) as gateway:
        with httpx.Client(base_url=gateway.base_url) as c:
            for headers in ({}, {"Authorization": "sk-wrong-123"}, {"Authorization": "Bearer sk-wrong-123"}):
                resp = c.post("/chat/completions", headers=headers, json={"model": "nanobanana"})
                assert resp.status_code == 401
                error = resp.json()["error"]
                assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
                assert "sk-wrong" not in resp.text and "sk-right" not in resp.text
            good = {"Authorization": "Bearer sk-right-key"}
            body = {"model": "nanobanana", "messages": [{"role": "user", "content": "hi"}]}
            assert c.post("/chat/completions", headers=good, json=body).status_code == 200
        seen = gateway.stats()["auth_headers_seen"]
    assert seen == sorted(["sk-wrong-123", "Bearer sk-wrong-123", "Bearer sk-right-key"])


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"image_config": {"aspect_ratio": "7:3"}}, "aspect_ratio"),
        ({"image_config": {"aspect_ratio": "1:8"}}, "aspect_ratio"),  # nanobanana_2 only
        ({"image_config": {"aspect_ratio": "1:1", "image_size": "1k"}}, "image_size"),
        ({"image_config": {"aspect_ratio": "1:1", "image_size": "512"}}, "image_size"),
        ({"image_config": {"aspect_ratio": "1:1", "quality": "hd"}}, "quality"),
        ({"extra_body": {"google": {"imageConfig": {"aspectRatio": "1:1"}}}}, "imageConfig"),
        ({"model": "dall-e-3"}, "dall-e-3"),
        ({"stream": True}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "content"),
    ],
)
def test_bad_requests_are_400_invalid_request_error(gw: MockGateway, fields: dict, needle: str) -> None:
    with client(gw) as c:
        resp = post(c, **fields)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]


def test_what_each_model_accepts(gw: MockGateway) -> None:
    with client(gw) as c:
        flash = post(c, model="nanobanana", image_config={"aspect_ratio": "1:1", "image_size": "4K"})
        budget = post(c, model="nanobanana_2", image_config={"aspect_ratio": "1:8", "image_size": "512"})
        assert c.get("/chat/completions").status_code == 405
        assert c.post("/v1/embeddings", json={}).status_code == 404
        no_prefix = httpx.post(gw.base_url.removesuffix("/v1") + "/chat/completions", headers=AUTH, json={})
    assert flash.status_code == 200 and png_size(images(flash)[0][1]) == (128, 128)  # image_size ignored
    assert budget.status_code == 200 and png_size(images(budget)[0][1]) == (176 // 8, 1408 // 8)
    assert budget.json()["usage"]["completion_tokens"] == 747
    assert no_prefix.status_code == 400  # routed, then rejected for the empty body


ERRORS = {
    "400": (400, "invalid_request_error"),
    "prompt_blocked": (400, "prompt_blocked"),
    "401": (401, "authentication_error"),
    "402": (402, "permission_error"),
    "403": (403, "permission_error"),
    "413": (413, "request_too_large"),
    "429_noretry": (429, "rate_limit_error"),
    "500": (500, "server_error"),
    "500_empty": (500, "server_error"),
    "502": (502, "server_error"),
    "503": (503, "server_error"),
    "504": (504, "server_error"),
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_error_faults(gw: MockGateway, kind: str) -> None:
    with client(gw) as c:
        resp = post(c, f"a cat [fault:{kind}]")
    status, type_ = ERRORS[kind]
    error = resp.json()["error"]
    assert (resp.status_code, error["type"]) == (status, type_) and set(error) >= {"message", "code", "param"}
    assert "retry-after" not in resp.headers and "retry" not in resp.text.lower()
    if kind == "503":
        assert "overloaded" in error["message"]
    if kind == "500_empty":
        assert error["code"] == "empty_response"
    if kind == "prompt_blocked":
        assert error["code"] == "prompt_blocked"


def test_transport_and_body_faults(gw: MockGateway) -> None:
    with client(gw) as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            post(c, "[fault:drop]")
        with pytest.raises(httpx.RemoteProtocolError, match="expected"):
            post(c, "[fault:truncate]")
        html = post(c, "[fault:html]")
        assert html.status_code == 502 and html.headers["content-type"] == "text/html"
        assert html.text.startswith("<html>")
        empty = post(c, "[fault:empty]")
        assert empty.status_code == 200 and empty.content == b""
        garbage = post(c, "[fault:badjson]")
        assert garbage.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            garbage.json()
        relayed = post(c, "[fault:400_relayed]")
        assert relayed.status_code == 400
        assert relayed.json()["error"]["type"] == "" and relayed.json()["error"]["code"] == 400
        assert "(request id: " in relayed.json()["error"]["message"]
    stats = gw.stats()
    assert stats["by_status"]["drop"] == 1 and stats["by_status"]["truncate"] == 1
    assert stats["generations"] == 0


def test_answers_without_a_usable_image(gw: MockGateway) -> None:
    with client(gw) as c:
        filtered = [post(c, f"[fault:content_filter] {n}").json()["choices"][0] for n in range(6)]
        text = post(c, "[fault:text_only]").json()["choices"][0]
        not_image = post(c, "[fault:not_image]")
        two = post(c, "[fault:two_images]")
    assert {choice["finish_reason"] for choice in filtered} == {"content_filter"}
    assert {bool(choice["message"]["content"]) for choice in filtered} == {True, False}  # "" or a refusal
    assert all("data:" not in choice["message"]["content"] for choice in filtered)
    assert text["finish_reason"] == "stop" and text["message"]["content"] and "data:" not in text["message"]["content"]
    [(mime, data)] = images(not_image)
    assert mime == "png" and not data.startswith(PNG_SIGNATURE)
    pair = images(two)
    content = two.json()["choices"][0]["message"]["content"]
    assert len(pair) == 2 and pair[0][1] != pair[1][1] and content.count("\n") == 2
    assert all(png_size(data) for _, data in pair)
    assert gw.stats()["generations"] == 1  # only two_images delivered real images


def test_slow_is_a_client_timeout_and_the_server_lets_go(gw: MockGateway) -> None:
    with client(gw, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        post(c, "[fault:slow]")
    deadline = time.monotonic() + 2
    while gw.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.stats()["in_flight"] == 0


def test_counted_markers_fail_n_times_then_succeed(gw: MockGateway) -> None:
    with client(gw) as c:
        statuses = [post(c, "flaky [fault:503x2]").status_code for _ in range(4)]
        other_config = post(c, "flaky [fault:503x2]", image_config={"aspect_ratio": "3:2"}).status_code
        chained = [post(c, "[fault:503x1] [fault:429x1]").status_code for _ in range(3)]
        unknown = post(c, "[fault:nonsense]").status_code
        c.post("/mock/reset?faults=1")
        after_reset = post(c, "flaky [fault:503x2]").status_code
    assert statuses == [503, 503, 200, 200]
    assert other_config == 503  # counted per prompt text + model + image_config
    assert chained == [503, 429, 200]
    assert unknown == 200 and after_reset == 503


def test_random_faults_are_reproducible() -> None:
    def statuses() -> list[int]:
        with MockGateway(MockConfig(fault_rates=(("503", 0.4), ("429", 0.2)), seed=7)) as gateway, client(gateway) as c:
            return [post(c, f"p{n}").status_code for n in range(30)]

    first = statuses()
    assert first == statuses() and {200, 429, 503} == set(first)


@pytest.mark.parametrize("mode", ["header", "body", "both", "none"])
def test_rpm_limit_gives_429_with_the_wait(mode: str) -> None:
    config = MockConfig(rpm_limit=60, rpm_window_s=2, retry_after=mode)  # at most 2 per 2 s
    with MockGateway(config) as gateway, client(gateway) as c:
        statuses = [post(c, f"p{n}").status_code for n in range(3)]
        resp = post(c, "one more")
        stats = gateway.stats()
    assert statuses == [200, 200, 429]
    assert resp.status_code == 429 and resp.json()["error"]["type"] == "rate_limit_error"
    assert ("retry-after" in resp.headers) == (mode in ("header", "both"))
    if "retry-after" in resp.headers:
        assert resp.headers["retry-after"] in ("1", "2")
    error = resp.json()["error"]
    if mode in ("body", "both"):
        assert re.search(r"Please retry in \d+\.\ds", error["message"])
        assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
        assert error["details"][0]["retryDelay"] in ("1s", "2s")
    else:
        assert "details" not in error
    assert stats["rate_limited"] == 2 and stats["generations"] == 2 and stats["by_status"] == {"200": 2, "429": 2}


def test_injected_429_announces_a_short_wait(gw: MockGateway) -> None:
    with client(gw) as c:
        resp = post(c, "[fault:429]")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"


def test_stats_count_requests_generations_and_concurrency() -> None:
    gateway = MockGateway(MockConfig(latency_s=0.3))
    limits = httpx.Limits(max_connections=10)
    with gateway, client(gateway, limits=limits) as c, ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda n: post(c, f"p{n % 3}").status_code, range(6)))
        post(c, "[fault:400]")
        over_http = c.get("/mock/stats").json()
        stats = gateway.stats()
        assert c.post("/mock/reset").json() == {"ok": True}
        reset = c.get("/mock/stats").json()
    assert statuses == [200] * 6
    assert stats["requests"] == 7 and stats["generations"] == 6 and stats["max_in_flight"] == 6
    assert stats["by_status"] == {"200": 6, "400": 1} and stats["in_flight"] == 0
    assert stats["by_prompt"] == {"p0": 2, "p1": 2, "p2": 2, "[fault:400]": 1}
    assert stats["auth_headers_seen"] == ["Bearer sk-test"]
    assert over_http == stats
    assert reset["requests"] == 0 and reset["by_prompt"] == {} and reset["max_in_flight"] == 0


def test_malformed_traffic_never_hurts_the_server(gw: MockGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert raw_exchange(gw, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nbad header\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_exchange(gw, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    assert raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort") == b""
    assert raw_exchange(gw, b"POST /v1/chat/completions HTT") == b""
    assert b'"type": "invalid_request_error"' in raw_exchange(
        gw, b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer k\r\nContent-Length: 3\r\n\r\n{x}"
    )
    with client(gw) as c:
        assert post(c).status_code == 200
    assert [r.getMessage() for r in caplog.records] == []


def test_many_connections_at_once(gw: MockGateway) -> None:
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(200)]
    try:
        with client(gw, limits=httpx.Limits(max_connections=64)) as c, ThreadPoolExecutor(32) as pool:
            assert set(pool.map(lambda n: post(c, f"p{n}").status_code, range(300))) == {200}
    finally:
        for sock in socks:
            sock.close()
    assert gw.stats()["connections"] >= 201


def test_full_size_images_and_other_formats() -> None:
    started = time.monotonic()
    with MockGateway(MockConfig(image_scale=1, pad_bytes=100_000)) as gateway, client(gateway) as c:
        resp = post(c, image_config={"aspect_ratio": "16:9", "image_size": "2K"})
    [(_, data)] = images(resp)
    assert png_size(data) == (2752, 1536) and b"paDd" in png_chunks(data) and len(data) > 100_000
    assert time.monotonic() - started < 2
    if not pillow_available():
        pytest.skip("jpeg and webp need Pillow")
    for mime, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        with MockGateway(MockConfig(mime=mime)) as gateway, client(gateway) as c:
            [(got, data)] = images(post(c))
        assert got == mime and data.startswith(magic)


def test_bad_configs_fail_at_start() -> None:
    for config in (MockConfig(mime="gif"), MockConfig(retry_after="later"), MockConfig(fault_rates=(("boom", 0.1),))):
        with pytest.raises(ValueError):
            MockGateway(config).start()
    assert "slow" in FAULT_KINDS and len(FAULT_KINDS) == 24


def test_stop_is_prompt_with_requests_in_flight() -> None:
    gateway = MockGateway()
    gateway.start()
    errors: list[BaseException] = []

    def hang() -> None:
        with client(gateway, timeout=30) as c:
            try:
                post(c, "[fault:slow]")
            except httpx.HTTPError as exc:
                errors.append(exc)

    worker = threading.Thread(target=hang)
    worker.start()
    while not gateway.stats()["in_flight"]:
        time.sleep(0.01)
    started = time.monotonic()
    gateway.stop()
    worker.join(5)
    assert time.monotonic() - started < 3 and errors and not worker.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{gateway.port}/mock/stats")
