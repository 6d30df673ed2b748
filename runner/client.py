"""One request to the gateway: build the body, send it, and turn the answer into images or a Failure."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx

from .items import Item
from .policy import Failure, classify_status, clean_message

# Big answers (a 2K image is a few MB of base64) are parsed off the event loop.
THREAD_PARSE_BYTES = 512 * 1024
_B64_STEP = 1 << 20  # base64 characters decoded per step (a multiple of 4)
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,([A-Za-z0-9+/=\s]*)")


def is_whole_image(mime: str, data: bytes) -> bool:
    """Are these bytes an image of this type, start to end? A cut-off file must not pass as ok."""
    if mime == "image/png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    if mime in ("image/jpeg", "image/jpg"):
        return data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00\r\n").endswith(b"\xff\xd9")
    if mime == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 == len(data)
    if mime == "image/gif":
        return data[:6] in (b"GIF87a", b"GIF89a") and data.endswith(b";")
    return False


@dataclass(frozen=True)
class Image:
    data: bytes
    mime: str


@dataclass(frozen=True)
class Success:
    images: list[Image]
    text: str
    usage: dict[str, Any] | None
    request_id: str | None


Outcome = Success | Failure


def request_body(item: Item) -> dict[str, Any]:
    """The JSON body exactly as the gateway documents it."""
    return {
        "model": item.model,
        "stream": False,
        "messages": [{"role": "user", "content": item.prompt}],
        "extra_body": {"google": {"image_config": item.config.as_sent()}},
    }


def make_http_client(
    base_url: str, api_key: str, timeout_s: float, concurrency: int, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The run's one HTTP client, its pool sized to concurrency.

    `transport` is the seam tests and benchmarks use. By default requests go over aiohttp
    (httpx-aiohttp): httpx's own pool scans every connection on every request, which cost
    14 ms of CPU per request at 64 in flight against 2 ms over aiohttp
    (benchmarks/bench_throughput.py). RUNNER_HTTP_TRANSPORT=httpx selects httpx's own.
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0), pool=None)
    if transport is None and os.environ.get("RUNNER_HTTP_TRANSPORT", "aiohttp") != "httpx":
        transport = _aiohttp_transport(limits)
    return httpx.AsyncClient(
        base_url=base_url + "/",
        headers={"Authorization": f"Bearer {api_key}", "User-Agent": "runner"},
        timeout=timeout,
        limits=limits,
        transport=transport,
        follow_redirects=False,
    )


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    def session() -> aiohttp.ClientSession:
        # trust_env: honour HTTP(S)_PROXY and NO_PROXY as httpx would.
        connector = aiohttp.TCPConnector(limit=limits.max_connections or 0, ssl=httpx.create_ssl_context())
        return aiohttp.ClientSession(connector=connector, trust_env=True)

    return AiohttpTransport(limits=limits, client=session)


class Client:
    """Sends items to `POST {base_url}/chat/completions` and classifies every answer."""

    def __init__(self, http: httpx.AsyncClient, api_key: str | None, timeout_s: float) -> None:
        self.http = http
        self.url = http.base_url.join("chat/completions")
        self.timeout_s = timeout_s
        self._key = api_key

    async def generate(self, item: Item) -> Outcome:
        try:
            # timeout_s bounds the whole request; httpx's own timeouts bound each read.
            with anyio.fail_after(self.timeout_s):
                async with self.http.stream("POST", self.url, json=request_body(item)) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
        except (TimeoutError, httpx.TimeoutException) as e:
            if isinstance(e, httpx.TimeoutException) and not isinstance(e.__cause__, (TimeoutError, type(None))):
                # httpx-aiohttp reports a dropped connection as a ConnectTimeout: say what it was.
                return Failure("connection", None, self._msg(f"{type(e.__cause__).__name__}: {e}"))
            return Failure("timeout", None, f"no complete answer within {self.timeout_s:g}s")
        except (httpx.TransportError, httpx.DecodingError) as e:  # dropped, refused, cut off mid-body
            return Failure("connection", None, self._msg(f"{type(e).__name__}: {e}"))
        except (OSError, ValueError, RuntimeError) as e:  # whatever else a transport raises costs one attempt
            return Failure("connection", None, self._msg(f"{type(e).__name__}: {e}"))
        if resp.status_code != 200:
            return classify_status(resp.status_code, bytes(body[:20_000]), resp.headers, self._key)
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(parse_completion, body, self._key)
        return parse_completion(body, self._key)

    def _msg(self, text: str) -> str:
        return clean_message(text, self._key)


def parse_completion(body: bytes | bytearray, api_key: str | None = None) -> Outcome:
    """A 200 answer -> Success with decoded, checked images, or the Failure it really is."""
    cut = _cut_images(body)
    if cut is not None:
        outcome = _parse(cut[0], cut[1], api_key)
        if outcome is not None:
            return outcome
    return _parse(body, None, api_key) or Failure("invalid_response", 200, "unreadable answer")


def _cut_images(body: bytes | bytearray) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """Take the base64 images out of the raw body before JSON parsing, decoding them in steps.

    A 4K answer is 20 MB of base64: parsing it as JSON, then matching and decoding it as a
    string, holds the GIL for ~140 ms in a few calls and keeps several copies alive. Cut out
    of the bytes and decoded a MiB at a time, it takes ~50 ms in short steps. Anything
    unusual (escapes, whitespace, no image) returns None: the plain path handles it.
    """
    if body.find(b"data:image/") < 0:
        return None
    view = memoryview(body)
    parts: list[bytes] = []
    images: list[tuple[str, bytes]] = []
    pos = 0
    while (i := body.find(b"data:image/", pos)) >= 0:
        j = body.find(b";base64,", i, i + 80)
        end = body.find(b")", j) if j >= 0 else -1
        if end < 0:
            return None
        try:
            chunks = [
                binascii.a2b_base64(view[k : min(k + _B64_STEP, end)], strict_mode=True)
                for k in range(j + 8, end, _B64_STEP)
            ]
        except binascii.Error:
            return None
        images.append((bytes(body[i + 5 : j]).decode("ascii", "replace").lower(), b"".join(chunks)))
        parts.append(bytes(view[pos : j + 8]))
        pos = end
    parts.append(bytes(view[pos:]))
    return b"".join(parts), images


def _decode_content(content: str) -> list[tuple[str, bytes]] | None:
    found = []
    for m in _DATA_URI.finditer(content):
        try:
            found.append((m.group(1).lower(), base64.b64decode(m.group(2), validate=False)))
        except (binascii.Error, ValueError):
            return None
    return found


def _parse(doc: bytes | bytearray, cut: list[tuple[str, bytes]] | None, api_key: str | None) -> Outcome | None:
    """Classify a parsed answer; `cut` holds images already taken out of `doc` (None if not).

    Returns None when the cut images do not match the content (the caller parses plainly)."""
    try:
        obj = json.loads(doc)
    except ValueError:
        if cut is not None:
            return None
        return Failure("invalid_response", 200, clean_message(f"body is not JSON: {bytes(doc[:120])!r}", api_key))
    try:
        choice = obj["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content") or ""
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return Failure("invalid_response", 200, "answer has no choices[0].message")
    request_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    if not isinstance(content, str):
        return Failure("invalid_response", 200, "message content is not a string", request_id=request_id)
    if cut is not None and content.count("data:image/") != len(cut):
        return None  # an image outside the content, or in a form we did not cut: parse plainly
    found = cut if cut is not None else _decode_content(content)
    if found is None:
        return Failure("invalid_response", 200, "image data is not valid base64", request_id=request_id)
    images: list[Image] = []
    for mime, data in found:
        if not is_whole_image(mime, data):
            return Failure("invalid_response", 200, f"data claims {mime} but is not a whole one", request_id=request_id)
        images.append(Image(data, "image/jpeg" if mime == "image/jpg" else mime))
    text = _DATA_URI.sub("", content)
    text = re.sub(r"!\[[^\]]*\]\(\)", "", text).strip()
    if finish == "content_filter":
        why = f": {text[:200]}" if text else ""
        return Failure(
            "content_filter",
            200,
            clean_message(f"image blocked by the safety filter{why}", api_key),
            request_id=request_id,
        )
    if not images:
        said = f": {text[:200]}" if text else " (empty content)"
        return Failure("no_image", 200, clean_message(f"answer has no image{said}", api_key), request_id=request_id)
    return Success(images, text, usage, request_id)
