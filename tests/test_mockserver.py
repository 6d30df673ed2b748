"""The mock gateway over real loopback HTTP: images, validation, reference images, parameters, both
flavours, every fault kind, limits and stats."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import runner.mock.gateway
from runner.mock import (
    FAULT_KINDS,
    PNG_SIGNATURE,
    MockConfig,
    MockGateway,
    data_uri,
    pillow_available,
    render_image,
    request_digest,
)
from runner.models import pixel_size

AUTH = {"Authorization": "Bearer sk-test"}
DATA_URI = re.compile(r"!\[image\]\(data:image/(\w+);base64,([A-Za-z0-9+/=]*)\)")
MB20 = 20 * 1024 * 1024
# Reference images: only the magic bytes matter to the gateway, so most are a header and padding.
PNG_A, PNG_B = render_image(16, 16, b"input a"), render_image(24, 16, b"input b")
JPEG = b"\xff\xd8\xff\xe0" + bytes(60)
WEBP = b"RIFF" + (52).to_bytes(4, "little") + b"WEBPVP8 " + bytes(44)
HEIC = (24).to_bytes(4, "big") + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(40)
HEIF = (24).to_bytes(4, "big") + b"ftypXYZ1" + bytes(4) + b"avifmsf1" + bytes(40)  # a compatible brand only


@pytest.fixture
def gw() -> Iterator[MockGateway]:
    with MockGateway() as gateway:
        yield gateway


def client(gateway: MockGateway, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, headers=AUTH, timeout=kw.pop("timeout", 10), **kw)


def uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def post(
    c: httpx.Client, prompt: str = "a cat", model: str = "nanobanana_pro", images: tuple[str, ...] = (), **fields: Any
) -> httpx.Response:
    content: Any = prompt
    if images:
        content = [{"type": "text", "text": prompt}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    body: dict[str, Any] = {"model": model, "stream": False, "messages": [{"role": "user", "content": content}]}
    if "image_config" in fields:
        body["extra_body"] = {"google": {"image_config": fields.pop("image_config")}}
    body.update(fields)
    return c.post("/chat/completions", json=body)


def images(resp: httpx.Response) -> list[tuple[str, bytes]]:
    """The answer's images, from Markdown in content or from message.images, whichever the flavour uses."""
    message = resp.json()["choices"][0]["message"]
    if "images" in message:
        urls = [part["image_url"]["url"] for part in message["images"]]
        assert [part["index"] for part in message["images"]] == list(range(len(urls)))
        assert "data:" not in (message["content"] or "")
        found = [re.fullmatch(r"data:image/(\w+);base64,([A-Za-z0-9+/=]*)", url) for url in urls]
        pairs = [m.groups() for m in found if m]
    else:
        pairs = DATA_URI.findall(message["content"])
    return [(mime, base64.b64decode(data)) for mime, data in pairs]


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    """Chunk type -> data (IDATs and tEXts joined), checking every CRC on the way."""
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


def png_digest(data: bytes) -> str:
    key, _, value = png_chunks(data)[b"tEXt"].partition(b"\0")
    assert key == b"runner-mock-request"
    return value.decode()


def raw_exchange(gateway: MockGateway, data: bytes, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


# -- the gateway as documented ---------------------------------------------------------------
def test_a_valid_request_gets_a_png_of_the_model_size_divided_by_the_scale(gw: MockGateway) -> None:
    with client(gw) as c:
        resp = post(c, image_config={"aspect_ratio": "16:9", "image_size": "2K"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert re.fullmatch(r"chatcmpl-\d{23}[A-Za-z0-9]{8}", body["id"])
    assert body["object"] == "chat.completion" and body["model"] == "nanobanana_pro"
    assert body["choices"][0]["finish_reason"] == "stop" and "images" not in body["choices"][0]["message"]
    usage = body["usage"]
    assert 1120 + 100 <= usage["completion_tokens"] <= 1120 + 300
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    [(mime, data)] = images(resp)
    width, height = pixel_size("nanobanana_pro", "16:9", "2K")
    assert mime == "png" and png_size(data) == (width // 8, height // 8)
    assert png_digest(data) == request_digest("nanobanana_pro", "a cat", "16:9", "2K", [], {})


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


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": list(parts)}]


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
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"n": 2}, "Multiple candidates"),
        # reference images: the message names the part
        ({"messages": user(image_part(uri("image/png", PNG_A)))}, "non-empty text part"),
        ({"messages": user(text_part(" "), image_part(uri("image/png", PNG_A)))}, "non-empty text part"),
        ({"messages": user(text_part("x"), {"type": "input_audio"})}, "messages[1].content[1]"),
        ({"messages": user(text_part("x"), image_part(uri("image/gif", b"GIF89a")))}, "content[1]: unsupported"),
        ({"messages": user(text_part("x"), image_part(uri("image/png", JPEG)))}, "content[1]: the image data"),
        ({"messages": user(text_part("x"), image_part(uri("image/jpeg", PNG_A)))}, "not a valid image/jpeg"),
        ({"messages": user(text_part("x"), image_part(uri("image/webp", b"RIFF0000WAVE")))}, "image/webp"),
        ({"messages": user(text_part("x"), image_part(uri("image/heic", b"\0\0\0\x18ftypisom")))}, "image/heic"),
        ({"messages": user(text_part("x"), image_part("data:image/png;base64,iVBOR!!"))}, "not valid base64"),
        ({"messages": user(text_part("x"), image_part("data:image/png,rawbytes"))}, "must be base64"),
        ({"messages": user(text_part("x"), image_part("ftp://example.com/a.png"))}, "http(s) URL"),
        ({"messages": user(text_part("x"), {"type": "image_url", "image_url": "https://a/b.png"})}, "content[1]"),
        # parameters: the message names the field
        ({"seed": 0}, "seed"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**31}, "seed"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": False}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10.5}, "max_tokens"),
    ],
)
def test_bad_requests_are_400_invalid_request_error(gw: MockGateway, fields: dict, needle: str) -> None:
    with client(gw) as c:
        resp = post(c, **fields)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]
    assert gw.stats()["generations"] == 0


def test_what_each_model_accepts(gw: MockGateway) -> None:
    with client(gw) as c:
        flash = post(c, model="nanobanana", image_config={"aspect_ratio": "1:1", "image_size": "4K"})
        budget = post(c, model="nanobanana_2", image_config={"aspect_ratio": "1:8", "image_size": "512"})
        assert c.get("/chat/completions").status_code == 405
        assert c.post("/v1/embeddings", json={}).status_code == 404
        no_prefix = httpx.post(gw.base_url.removesuffix("/v1") + "/chat/completions", headers=AUTH, json={})
    assert flash.status_code == 200 and png_size(images(flash)[0][1]) == (128, 128)  # image_size ignored
    assert png_digest(images(flash)[0][1]) == request_digest("nanobanana", "a cat", "1:1", "1K", [], {})
    assert budget.status_code == 200 and png_size(images(budget)[0][1]) == (176 // 8, 1408 // 8)
    assert budget.json()["usage"]["completion_tokens"] == 747
    assert no_prefix.status_code == 400  # routed, then rejected for the empty body


# -- reference images --------------------------------------------------------------------------
def test_reference_images_of_every_accepted_kind_are_read_in_order(gw: MockGateway) -> None:
    sent = [
        uri("image/png", PNG_A),
        uri("image/jpeg", JPEG),
        "https://example.com/ref.webp?v=1",
        uri("image/webp", WEBP),
        uri("image/heic", HEIC),
        uri("image/heif", HEIF),
        "http://example.com/b.png",
    ]
    expected = [
        hashlib.sha256(PNG_A).hexdigest(),
        hashlib.sha256(JPEG).hexdigest(),
        "https://example.com/ref.webp?v=1",
        hashlib.sha256(WEBP).hexdigest(),
        hashlib.sha256(HEIC).hexdigest(),
        hashlib.sha256(HEIF).hexdigest(),
        "http://example.com/b.png",
    ]
    detail = {"type": "image_url", "image_url": {"url": uri("image/png", PNG_B), "detail": "high"}}
    with client(gw) as c:
        resp = post(c, "combine these", images=tuple(sent), seed=7, image_config={"aspect_ratio": "3:2"})
        two_texts = c.post(
            "/chat/completions",
            json={"model": "nanobanana", "messages": user(text_part("first"), detail, text_part("second"))},
        )
    assert resp.status_code == 200 and two_texts.status_code == 200
    [(_, data)] = images(resp)
    assert png_digest(data) == request_digest("nanobanana_pro", "combine these", "3:2", "1K", expected, {"seed": 7})
    [(_, other)] = images(two_texts)
    b_sha = hashlib.sha256(PNG_B).hexdigest()
    # no aspect_ratio sent: the first reference image's shape (24x16 is 3:2), as Google does
    assert png_digest(other) == request_digest("nanobanana", "first\nsecond", "3:2", "1K", [b_sha], {})
    log = gw.stats()["requests_log"]
    assert [entry["inputs"] for entry in log] == [expected, [b_sha]]
    assert log[0]["prompt"] == "combine these" and log[1]["prompt"] == "first\nsecond"


def test_the_image_depends_on_each_input_and_its_place(gw: MockGateway) -> None:
    a, b = uri("image/png", PNG_A), uri("image/png", PNG_B)
    with client(gw) as c:
        got = {name: images(post(c, "mix", images=refs))[0][1] for name, refs in {"ab": (a, b), "ba": (b, a)}.items()}
        got["a"] = images(post(c, "mix", images=(a,)))[0][1]
        got["none"] = images(post(c, "mix"))[0][1]
        again = images(post(c, "mix", images=(a, b)))[0][1]
        got["url"] = images(post(c, "mix", images=("https://example.com/a.png",)))[0][1]
    assert again == got["ab"]
    assert len({data for data in got.values()}) == len(got)


@pytest.mark.parametrize(("model", "limit"), [("nanobanana", 3), ("nanobanana_pro", 14), ("nanobanana_2", 14)])
def test_input_image_limits_per_model(gw: MockGateway, model: str, limit: int) -> None:
    refs = tuple(f"https://example.com/{n}.png" for n in range(limit + 1))
    with client(gw) as c:
        ok = post(c, "many", model=model, images=refs[:limit])
        over = post(c, "many", model=model, images=refs)
    assert ok.status_code == 200
    assert over.status_code == 400 and f"at most {limit}" in over.json()["error"]["message"]


def test_requests_up_to_20_mb_are_read_and_bigger_ones_get_the_gateways_413(gw: MockGateway) -> None:
    def body(image_bytes: int) -> bytes:
        big = uri("image/png", PNG_SIGNATURE + bytes(image_bytes))
        message = {"role": "user", "content": [text_part("big"), image_part(big)]}
        return json.dumps({"model": "nanobanana_pro", "messages": [message]}).encode()

    fits = body(MB20 * 3 // 4 - 200)
    fits += b" " * (MB20 - len(fits))  # exactly 20 MB
    too_big = fits + b" "
    with client(gw, timeout=30) as c:
        ok = c.post("/chat/completions", content=fits, headers={"Content-Type": "application/json"})
        refused = c.post("/chat/completions", content=too_big, headers={"Content-Type": "application/json"})
        chunked = c.post("/chat/completions", content=iter([too_big[: MB20 // 2], too_big[MB20 // 2 :]]))
        after = post(c)  # the connection (or the pool) still works
    assert len(fits) == MB20 and ok.status_code == 200
    for resp in (refused, chunked):
        assert resp.status_code == 413
        assert resp.json()["error"] == {
            "message": "Request body too large", "type": "request_too_large", "code": "request_too_large", "param": None
        }  # fmt: skip
    assert after.status_code == 200
    assert gw.stats()["by_status"] == {"200": 2, "413": 2}


# -- parameters --------------------------------------------------------------------------------
def test_seed_temperature_and_top_p_change_the_image_max_tokens_does_not(gw: MockGateway) -> None:
    with client(gw) as c:
        plain = images(post(c, "p"))[0][1]
        seeded = {s: images(post(c, "p", seed=s))[0][1] for s in (1, 2, -5)}
        warm, warm_int = images(post(c, "p", temperature=1.0))[0][1], images(post(c, "p", temperature=1))[0][1]
        top_p = images(post(c, "p", top_p=0.5))[0][1]
        capped = images(post(c, "p", max_tokens=1000, seed=None))[0][1]
        everything = post(c, "p", seed=1, temperature=0.2, top_p=0.9, max_tokens=64)
    assert len({plain, *seeded.values(), warm, top_p}) == 6
    assert warm == warm_int and capped == plain
    params = {"seed": 1, "temperature": 0.2, "top_p": 0.9, "max_tokens": 64}
    assert png_digest(images(everything)[0][1]) == request_digest("nanobanana_pro", "p", "1:1", "1K", [], params)
    assert gw.stats()["requests_log"][-1]["params"] == params
    assert gw.stats()["requests_log"][-2]["params"] == {"max_tokens": 1000}  # a null seed is no seed


# -- flavours and answer formats ---------------------------------------------------------------
def test_nanobanana_reads_extra_body_and_ignores_a_top_level_image_config(gw: MockGateway) -> None:
    with client(gw) as c:
        body = {"model": "nanobanana_pro", "messages": [{"role": "user", "content": "x"}]}
        top = c.post("/chat/completions", json={**body, "image_config": {"aspect_ratio": "16:9", "image_size": "2K"}})
        read = post(c, "x", image_config={"aspect_ratio": "16:9"})
    assert top.status_code == read.status_code == 200
    assert png_size(images(top)[0][1]) == (128, 128)
    assert png_size(images(read)[0][1]) == (1376 // 8, 768 // 8)
    log = gw.stats()["requests_log"]
    assert [(e["image_config"], e["config_from"]) for e in log] == [
        (None, None),
        ({"aspect_ratio": "16:9"}, "extra_body"),
    ]


def test_openai_compatible_flavour() -> None:
    with MockGateway(MockConfig(flavor="openai-compatible")) as gateway, client(gateway) as c:
        body = {"model": "nanobanana_2", "messages": [{"role": "user", "content": "a boat"}]}
        config = {"aspect_ratio": "4:1", "image_size": "2K"}
        top = c.post("/chat/completions", json={**body, "image_config": config, "modalities": ["image", "text"]})
        extra = post(c, "a boat", image_config={"aspect_ratio": "16:9"})
        text = c.post("/chat/completions", json={**body, "modalities": ["text"]})
        bad = c.post("/chat/completions", json={**body, "image_config": {"aspectRatio": "1:1"}})
        two = c.post(
            "/chat/completions", json={**body, "messages": [{"role": "user", "content": "[fault:two_images]"}]}
        )
        stats = gateway.stats()
    assert top.status_code == 200 and top.json()["choices"][0]["message"]["content"] is None
    [(mime, data)] = images(top)
    assert mime == "png" and png_size(data) == (4096 // 8, 1024 // 8)
    assert png_digest(data) == request_digest("nanobanana_2", "a boat", "4:1", "2K", [], {})
    assert extra.status_code == 400
    assert extra.json()["error"]["message"].endswith('Unknown name "extra_body": Cannot find field.')
    message = text.json()["choices"][0]["message"]
    assert text.status_code == 200 and message["content"] and "images" not in message
    assert bad.status_code == 400 and "aspectRatio" in bad.json()["error"]["message"]
    message = two.json()["choices"][0]["message"]
    assert message["content"] == "Here are two versions." and len(images(two)) == 2
    assert stats["generations"] == 2 and stats["requests_log"][0]["config_from"] == "top_level"
    assert stats["requests_log"][0]["image_config"] == config


@pytest.mark.parametrize(("flavor", "answer_format"), [("nanobanana", "images"), ("openai-compatible", "markdown")])
def test_answer_format_overrides_the_flavours(flavor: str, answer_format: str) -> None:
    config = MockConfig(flavor=flavor, answer_format=answer_format)
    with MockGateway(config) as gateway, client(gateway) as c:
        message = post(c, "[fault:unicode]", model="nanobanana").json()["choices"][0]["message"]
    if answer_format == "images":
        assert "images" in message and "![image]" not in message["content"]
    else:
        assert "images" not in message and message["content"].count("![image](data:image/png;base64,") == 1


def test_openai_compatible_429s_relay_googles_json_in_the_message() -> None:
    config = MockConfig(flavor="openai-compatible", rpm_limit=60, rpm_window_s=4, retry_after="both")  # 4 per 4 s
    with MockGateway(config) as gateway, client(gateway) as c:
        injected = post(c, "[fault:429]", model="nanobanana")
        noretry = post(c, "[fault:429_noretry]", model="nanobanana")
        statuses = [post(c, f"p{n}", model="nanobanana").status_code for n in range(3)]
        limited = post(c, "one more", model="nanobanana")
    assert statuses == [200, 200, 429]
    for resp, delays in ((injected, ["1s"]), (limited, ["1s", "2s", "3s", "4s"]), (noretry, None)):
        assert resp.status_code == 429 and "retry-after" not in resp.headers
        error = resp.json()["error"]
        assert error["code"] == "429"
        google = json.loads(error["message"][error["message"].index("{") :])["error"]
        assert google["code"] == 429 and google["status"] == "RESOURCE_EXHAUSTED"
        if delays is None:
            assert "details" not in google
        else:
            assert google["details"][0]["retryDelay"] in delays


# -- faults ------------------------------------------------------------------------------------
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


def test_transport_and_body_faults(gw: MockGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
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
    assert [e["status"] for e in stats["requests_log"][:2]] == [0, 200]
    assert [e["fault"] for e in stats["requests_log"][:2]] == ["drop", "truncate"]
    assert [r.getMessage() for r in caplog.records] == []


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


def pixels(data: bytes) -> set[bytes]:
    """The distinct RGB pixels of one of the mock's PNGs (filters 0 and 2 only: what it writes)."""
    width, height = png_size(data)
    raw, rows, stride = zlib.decompress(png_chunks(data)[b"IDAT"]), [], 1 + 3 * width
    for y in range(height):
        line = raw[y * stride + 1 : (y + 1) * stride]
        if raw[y * stride] == 2:
            line = bytes((a + b) & 255 for a, b in zip(line, rows[-1], strict=True))
        rows.append(line)
    return {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}


def test_broken_upstream_faults_are_paid_images(gw: MockGateway) -> None:
    with client(gw) as c:
        same = [  # one image for every request of a shape, whatever the prompt, model or inputs
            images(post(c, "[fault:same_image] 1"))[0][1],
            images(post(c, "[fault:same_image] 2", model="nanobanana"))[0][1],
            images(post(c, "[fault:same_image]", model="nanobanana_2", images=(uri("image/png", PNG_A),)))[0][1],
        ]
        other_shape = images(post(c, "[fault:same_image] 3", image_config={"aspect_ratio": "16:9"}))[0][1]
        square = images(post(c, "[fault:wrong_shape]"))[0][1]
        wide = images(post(c, "[fault:wrong_shape]", image_config={"aspect_ratio": "16:9"}))[0][1]
        flat = images(post(c, "[fault:uniform]", image_config={"aspect_ratio": "4:3"}))[0][1]
        normal = images(post(c, "not uniform", image_config={"aspect_ratio": "4:3"}))[0][1]
        zipped = post(c, "[fault:gzip]")
        gzip_body = {"model": "nanobanana", "messages": user(text_part("[fault:gzip]"))}
        with c.stream("POST", "/chat/completions", json=gzip_body) as raw:
            raw_bytes = b"".join(raw.iter_raw())
        fancy = post(c, "[fault:unicode]")
    assert len(set(same)) == 1 and other_shape not in same and png_size(other_shape) == (1376 // 8, 768 // 8)
    assert png_size(square) == (128, 64) and png_size(wide) == (768 // 8, 1376 // 8)
    assert png_size(flat) == (1200 // 8, 896 // 8) and len(pixels(flat)) == 1 and len(pixels(normal)) > 1
    assert zipped.headers["content-encoding"] == "gzip" and len(images(zipped)) == 1
    assert raw_bytes.startswith(b"\x1f\x8b") and json.loads(gzip.decompress(raw_bytes))["object"] == "chat.completion"
    content = fancy.json()["choices"][0]["message"]["content"]
    assert "\u200f" in content and "🎨" in content and "à" in content and len(images(fancy)) == 1
    assert "🎨".encode() in fancy.content  # raw UTF-8 in the body, not \\u escapes
    stats = gw.stats()
    assert stats["generations"] == 11 and stats["by_status"] == {"200": 11}
    assert stats["by_fault"] == {"same_image": 4, "wrong_shape": 2, "uniform": 1, "gzip": 2, "unicode": 1}


def test_slow_is_a_client_timeout_and_the_server_lets_go(gw: MockGateway) -> None:
    with client(gw, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        post(c, "[fault:slow]")
    deadline = time.monotonic() + 5
    while gw.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.stats()["in_flight"] == 0
    assert gw.stats()["requests_log"][0]["status"] == 0  # the client hung up before any answer


def test_counted_markers_fail_n_times_then_succeed(gw: MockGateway) -> None:
    with client(gw) as c:
        statuses = [post(c, "flaky [fault:503x2]").status_code for _ in range(4)]
        other_config = post(c, "flaky [fault:503x2]", image_config={"aspect_ratio": "3:2"}).status_code
        other_inputs = post(c, "flaky [fault:503x2]", images=("https://example.com/a.png",)).status_code
        chained = [post(c, "[fault:503x1] [fault:429x1]").status_code for _ in range(3)]
        unknown = post(c, "[fault:nonsense]").status_code
        c.post("/mock/reset?faults=1")
        after_reset = post(c, "flaky [fault:503x2]").status_code
    assert statuses == [503, 503, 200, 200]
    assert other_config == other_inputs == 503  # counted per request: prompt, model, image_config, inputs
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


# -- stats, connections, lifecycle -------------------------------------------------------------
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
    assert stats["connections"] == 6  # keep-alive: the seventh request reused a connection
    assert over_http == stats
    assert reset["requests"] == 0 and reset["by_prompt"] == {} and reset["max_in_flight"] == 0
    assert reset["requests_log"] == []


def test_requests_log_records_each_request_and_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.mock.gateway, "LOG_SIZE", 4)
    with MockGateway() as gateway, client(gateway) as c:
        post(c, "first")
        c.post("/chat/completions", headers={"Authorization": "Bearer x"}, content=b"{not json")
        post(c, "refs", model="nanobanana", images=("https://a.example/1.png", uri("image/png", PNG_A)), seed=3)
        post(c, "bad ref", images=(uri("image/png", JPEG),))
        post(c, "sized", image_config={"aspect_ratio": "2:3", "image_size": "4K"}, temperature=0.5)
        log = gateway.stats()["requests_log"]
    assert len(log) == 4 and log[0]["prompt"] is None and log[0]["status"] == 400  # "first" fell out
    assert log[1] == {
        "model": "nanobanana", "prompt": "refs", "image_config": None, "config_from": None,
        "inputs": ["https://a.example/1.png", hashlib.sha256(PNG_A).hexdigest()], "params": {"seed": 3},
        "status": 200, "fault": None,
    }  # fmt: skip
    assert log[2]["status"] == 400 and log[2]["prompt"] is None and log[2]["model"] == "nanobanana_pro"
    assert log[3]["image_config"] == {"aspect_ratio": "2:3", "image_size": "4K"}
    assert log[3]["config_from"] == "extra_body" and log[3]["params"] == {"temperature": 0.5}


def test_malformed_traffic_never_hurts_the_server(gw: MockGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # Refusals close the connection; the client keeps its side open (a half-close reads as a hang-up).
    refused = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ]
    for data in refused:
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", raw_exchange(gw, data, half_close=False)), data[:40]
    # A request cut short gets no answer, or a refusal if aiohttp parses its head before it sees the
    # end of the stream (it depends on timing): never anything else.
    for cut in (
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort",
        b"POST /v1/chat/completions HTT",
    ):
        assert re.match(rb"(HTTP/1\.[01] 4\d\d |$)", raw_exchange(gw, cut)), cut
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\nContent-Length: 3"
    assert b'"type": "invalid_request_error"' in raw_exchange(gw, head + b"\r\n\r\n{x}", half_close=False)
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
    with MockGateway(MockConfig(image_scale=1, pad_bytes=100_000)) as gateway, client(gateway) as c:
        resp = post(c, image_config={"aspect_ratio": "16:9", "image_size": "2K"})
    [(_, data)] = images(resp)
    assert png_size(data) == (2752, 1536) and b"paDd" in png_chunks(data) and len(data) > 100_000
    assert data_uri("png", data).startswith(b"data:image/png;base64,iVBOR")
    if not pillow_available():
        pytest.skip("jpeg and webp need Pillow")
    for mime, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        with MockGateway(MockConfig(mime=mime)) as gateway, client(gateway) as c:
            [(got, data)] = images(post(c))
        assert got == mime and data.startswith(magic)


def test_bad_configs_fail_at_start() -> None:
    bad = (
        MockConfig(mime="gif"),
        MockConfig(retry_after="later"),
        MockConfig(fault_rates=(("boom", 0.1),)),
        MockConfig(flavor="openai"),
        MockConfig(answer_format="html"),
    )
    for config in bad:
        with pytest.raises(ValueError):
            MockGateway(config).start()
    assert {"slow", "same_image", "wrong_shape", "uniform", "gzip", "unicode"} <= set(FAULT_KINDS)
    assert len(FAULT_KINDS) == len(set(FAULT_KINDS)) == 33


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
    worker.join(30)
    # far below the hour a slow answer takes: stop() ended the request in flight
    assert time.monotonic() - started < 30 and errors and not worker.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{gateway.port}/mock/stats")


def test_serve_runs_in_the_foreground_until_sigterm() -> None:
    cmd = [sys.executable, "-m", "runner", "mock-server", "--host", "127.0.0.1", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            m = re.fullmatch(r"mock gateway listening on (http://127\.0\.0\.1:\d+/v1)\n", proc.stdout.readline())
            assert m
            with httpx.Client(base_url=m.group(1), headers=AUTH, timeout=10) as c:
                assert post(c).status_code == 200
                assert c.get("/mock/stats").json()["generations"] == 1
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
