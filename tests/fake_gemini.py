"""A fake of Google's Gemini `generateContent` REST API on 127.0.0.1, to stand behind a real LiteLLM proxy in tests.

It speaks what LiteLLM's `gemini/...` provider sends with a custom `api_base` (`POST
{api_base}/models/{model}:generateContent`, key in the `x-goog-api-key` header), records every
request it got, answers like Gemini with a small real PNG that depends on the request, and can
answer the next requests with Google's 429 RESOURCE_EXHAUSTED carrying a RetryInfo `retryDelay`.
Like the real API it refuses unknown top-level fields (400 INVALID_ARGUMENT, "Unknown name").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_KEY = "fake-gemini-key-7c1d"  # what the proxy must send; a wrong one gets Google's 400 API_KEY_INVALID
# GenerateContentRequest's fields; proto JSON takes the lowerCamel and the snake_case spelling.
_KNOWN_FIELDS = frozenset(
    {"model", "contents", "tools", "toolConfig", "tool_config", "safetySettings", "safety_settings",
     "systemInstruction", "system_instruction", "generationConfig", "generation_config",
     "cachedContent", "cached_content"}
)  # fmt: skip
_UNITS = {"512": 2, "1K": 4, "2K": 8, "4K": 16}  # pixels per aspect unit: 16:9 at 2K is 128x72, small on purpose


def png(width: int, height: int, seed: bytes) -> bytes:
    """A valid RGB PNG whose pixels follow `seed`: different seeds give different bytes."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type None
        for x in range(width):
            i = (x // 4 + y // 4 * 7) % len(seed)
            rows += bytes((seed[i], seed[(i + 1) % len(seed)], (x * 255 // max(1, width - 1)) ^ seed[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")
    )


def field_of(obj: Any, camel: str) -> Any:
    """`obj[camel]` or its snake_case spelling: proto JSON (so Gemini) accepts both, and LiteLLM mixes them."""
    if not isinstance(obj, dict):
        return None
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def pixel_size(image_config: dict[str, Any]) -> tuple[int, int]:
    """The fake's image size for an image config: the aspect ratio's shape, scaled by the size tier."""
    try:
        w, h = (int(v) for v in str(image_config.get("aspectRatio") or "1:1").split(":"))
    except ValueError:
        w, h = 1, 1
    unit = _UNITS.get(str(image_config.get("imageSize") or "1K"), 4)
    return max(1, min(w * unit, 512)), max(1, min(h * unit, 512))


@dataclass
class Seen:
    """One HTTP request the fake received, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    raw: bytes
    at: float  # time.monotonic() on arrival
    status: int = 0
    body: Any = None  # the parsed JSON, or None
    image: bytes | None = None  # the PNG it answered with

    @property
    def model(self) -> str | None:
        """The Gemini model named in a `.../models/{model}:generateContent` path."""
        tail = self.path.rsplit("/models/", 1)
        return tail[1].split(":", 1)[0] if len(tail) == 2 else None

    @property
    def generation_config(self) -> dict[str, Any]:
        cfg = field_of(self.body, "generationConfig")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def image_config(self) -> dict[str, Any]:
        """`generationConfig.imageConfig` in camelCase, whichever spelling was sent; absent keys left out."""
        raw = field_of(self.generation_config, "imageConfig")
        names = ("aspectRatio", "imageSize")
        return {n: field_of(raw, n) for n in names if field_of(raw, n) is not None} if isinstance(raw, dict) else {}

    @property
    def seed(self) -> Any:
        return field_of(self.generation_config, "seed")

    @property
    def parts(self) -> list[dict[str, Any]]:
        """The parts of the last user turn."""
        contents = self.body.get("contents") if isinstance(self.body, dict) else None
        if not isinstance(contents, list) or not contents or not isinstance(contents[-1], dict):
            return []
        parts = contents[-1].get("parts")
        return parts if isinstance(parts, list) else []

    @property
    def text(self) -> str:
        return "".join(str(p["text"]) for p in self.parts if isinstance(p, dict) and "text" in p)

    @property
    def part_kinds(self) -> list[str]:
        """ "text", "image" or "other" for each part of the last user turn, in order."""
        return [
            "text" if "text" in p else "image" if field_of(p, "inlineData") is not None else "other"
            for p in self.parts
            if isinstance(p, dict)
        ]

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """(mime type, bytes) of every inline image in the last user turn, in order."""
        found = []
        for part in self.parts:
            data = field_of(part, "inlineData")
            if isinstance(data, dict):
                found.append((str(field_of(data, "mimeType")), base64.b64decode(str(field_of(data, "data")))))
        return found


@dataclass
class _RateLimit:
    remaining: int
    retry_delay: str
    message: str = field(
        default="You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
    )


def _resource_exhausted(limit: _RateLimit, model: str) -> web.Response:
    """Google's 429: the wait is only in the RetryInfo detail (no Retry-After header)."""
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_requests_per_model",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
        "quotaDimensions": {"location": "global", "model": model},
        "quotaValue": "10",
    }
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": limit.retry_delay},
    ]
    return google_error(429, "RESOURCE_EXHAUSTED", limit.message, details)


def google_error(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    """An error in Google's shape: {"error": {code, message, status, details}}."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


class FakeGemini:
    """The fake server, run on its own event loop in a background thread.

    `start()` returns the `api_base` to give LiteLLM (`http://127.0.0.1:PORT/v1beta`); `requests`
    is everything received so far; `rate_limit_next(n, "1s")` makes the next n generate calls 429s.
    """

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self._seen: list[Seen] = []
        self._cond = threading.Condition()
        self._rate_limit: _RateLimit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1beta"

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            except BaseException as exc:  # reported to start()'s caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-gemini", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"fake Gemini did not start: {failure[0] if failure else 'timed out'}")
        return self.api_base

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or self._thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(30)
        self._loop = None

    def __enter__(self) -> FakeGemini:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def requests(self) -> list[Seen]:
        with self._cond:
            return list(self._seen)

    def generations(self) -> list[Seen]:
        """The generateContent calls received so far."""
        return [s for s in self.requests if s.path.endswith(":generateContent")]

    def clear(self) -> None:
        with self._cond:
            self._seen.clear()
            self._rate_limit = None

    def rate_limit_next(self, count: int = 1, retry_delay: str = "1s") -> None:
        """Answer the next `count` generate calls with a 429 whose RetryInfo says `retry_delay`."""
        with self._cond:
            self._rate_limit = _RateLimit(count, retry_delay)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Seen]:
        """Block until at least `count` generate calls have been answered; the answered ones."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = [s for s in self._seen if s.path.endswith(":generateContent") and s.status]
                if len(done) >= count:
                    return done
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake Gemini saw {len(done)} generate calls, not {count}, in {timeout}s")
                self._cond.wait(left)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            raw=await request.read(),
            at=time.monotonic(),
        )
        try:
            seen.body = json.loads(seen.raw) if seen.raw else None
        except ValueError:
            seen.body = None
        response = self._answer(seen)
        seen.status = response.status
        with self._cond:
            self._seen.append(seen)
            self._cond.notify_all()
        return response

    def _answer(self, seen: Seen) -> web.Response:
        if seen.method != "POST" or not seen.path.endswith(":generateContent") or seen.model is None:
            return google_error(
                404,
                "NOT_FOUND",
                f"The fake serves only POST .../models/MODEL:generateContent, not {seen.method} {seen.path}",
            )
        key = seen.headers.get("x-goog-api-key") or seen.query.get("key")
        if key != self.api_key:
            reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            return google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [reason])
        if not isinstance(seen.body, dict):
            return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        unknown = sorted(set(seen.body) - _KNOWN_FIELDS)
        if unknown:
            lines = [f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.' for name in unknown]
            violations = [{"description": line} for line in lines]
            bad = {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}
            return google_error(400, "INVALID_ARGUMENT", "\n".join(lines), [bad])
        if not seen.parts:
            return google_error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
        with self._cond:
            limit = self._rate_limit
            if limit is not None and limit.remaining > 0:
                limit.remaining -= 1
                return _resource_exhausted(limit, str(seen.model))
        # The image follows the whole request (text, config, seed and every inline image), so two
        # different requests never get the same bytes and a test can tell which answer went where.
        digest = hashlib.sha256(seen.raw).digest()
        seen.image = png(*pixel_size(seen.image_config), digest)
        image_parts = seen.part_kinds.count("image")
        return web.json_response(
            {
                "candidates": [
                    {
                        "content": {
                            "role": "model",
                            "parts": [
                                {"text": "Here is the image."},
                                {
                                    "inlineData": {
                                        "mimeType": "image/png",
                                        "data": base64.b64encode(seen.image).decode(),
                                    }
                                },
                            ],
                        },
                        "finishReason": "STOP",
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": 12 + 258 * image_parts,
                    "candidatesTokenCount": 1120,
                    "totalTokenCount": 1132 + 258 * image_parts,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}]
                    + ([{"modality": "IMAGE", "tokenCount": 258 * image_parts}] if image_parts else []),
                    "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}],
                },
                "modelVersion": seen.model,
                "responseId": "fake-" + digest.hex()[:20],
            }
        )
