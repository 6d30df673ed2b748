"""One request to the gateway: build the body, send it, and turn the answer into images or a Failure."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import httpx

from .items import Item
from .policy import Failure, classify_status, clean_message

# Big answers (a 2K image is a few MB of base64) are parsed off the event loop.
THREAD_PARSE_BYTES = 512 * 1024
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,([A-Za-z0-9+/=\s]*)")
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/jpg": (b"\xff\xd8\xff",),
    "image/webp": (b"RIFF",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}


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
    finish_reason: str | None
    reasoning: str | None = field(default=None, repr=False)


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
    """The run's one HTTP client: pool sized to concurrency; `transport` is the seam tests and benchmarks use."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0), pool=None)
    return httpx.AsyncClient(
        base_url=base_url + "/",
        headers={"Authorization": f"Bearer {api_key}", "User-Agent": "runner"},
        timeout=timeout,
        limits=limits,
        transport=transport,
        follow_redirects=False,
    )


class Client:
    """Sends items to `POST {base_url}/chat/completions` and classifies every answer."""

    def __init__(self, http: httpx.AsyncClient, api_key: str | None) -> None:
        self.http = http
        self._key = api_key

    async def generate(self, item: Item) -> Outcome:
        try:
            resp = await self.http.post("chat/completions", json=request_body(item))
            body = resp.content
        except httpx.TimeoutException as e:
            return Failure("timeout", None, self._msg(f"{type(e).__name__}: no answer in time"))
        except (httpx.TransportError, httpx.DecodingError) as e:  # dropped, refused, cut off mid-body
            return Failure("connection", None, self._msg(f"{type(e).__name__}: {e}"))
        if resp.status_code != 200:
            return classify_status(resp.status_code, body, resp.headers, self._key)
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(parse_completion, body, self._key)
        return parse_completion(body, self._key)

    def _msg(self, text: str) -> str:
        return clean_message(text, self._key)


def parse_completion(body: bytes, api_key: str | None = None) -> Outcome:
    """A 200 answer -> Success with decoded, checked images, or the Failure it really is."""
    try:
        obj = json.loads(body)
    except ValueError:
        return Failure("invalid_response", 200, clean_message(f"body is not JSON: {body[:120]!r}", api_key))
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
    images: list[Image] = []
    for m in _DATA_URI.finditer(content):
        mime = m.group(1).lower()
        try:
            data = base64.b64decode(m.group(2), validate=False)
        except (binascii.Error, ValueError):
            return Failure("invalid_response", 200, f"{mime} data is not valid base64", request_id=request_id)
        if not any(data.startswith(sig) for sig in _MAGIC.get(mime, ())) or (
            mime == "image/webp" and data[8:12] != b"WEBP"
        ):
            return Failure(
                "invalid_response", 200, f"data claims {mime} but its bytes are not one", request_id=request_id
            )
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
    reasoning = message.get("reasoning_content") if isinstance(message.get("reasoning_content"), str) else None
    return Success(images, text, usage, request_id, finish, reasoning)
