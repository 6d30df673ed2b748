"""A local stand-in for the Nano Banana chat-completions gateway, failures included, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from . import mockimages as mi
from .mockhttp import BackgroundServer, Reply, Request, json_reply, local_url, sleep_unless_hung_up, wait_for_interrupt
from .mockimages import ImageCache, data_uri, image_content, not_an_image, pillow_available, scaled_size
from .models import MODELS, effective_size

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = (
    "429", "429_noretry", "500", "500_empty", "502", "503", "504", "400", "400_relayed",
    "prompt_blocked", "401", "402", "403", "413", "drop", "truncate", "html", "empty",
    "badjson", "content_filter", "text_only", "not_image", "slow", "two_images",
)  # fmt: skip
_IMMEDIATE = {"400", "401", "402", "403", "413", "429", "429_noretry"}
_MARKER = re.compile(r"\[fault:([a-z0-9_]+?)(?:x(\d+))?\]")
_RETRY_AFTER_MODES = ("header", "body", "both", "none")
_SLOW_S = 3600.0


@dataclass(frozen=True)
class MockConfig:
    """How the mock behaves; the defaults answer at once, with small PNGs, and never fail."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    api_key: str | None = None  # None: any non-empty Bearer token is accepted
    latency_s: float = 0.0  # before answering each generation request...
    latency_jitter_s: float = 0.0  # ...plus uniform(0, jitter)
    image_scale: int = 8  # images are the model's pixel size integer-divided by this, at least 8x8
    mime: str = "png"  # png | jpeg | webp (the last two need Pillow)
    pad_bytes: int = 0  # a padding chunk/comment of this size in every image (memory benchmarks)
    rpm_limit: int = 0  # 0: none; else at most max(1, int(rpm_limit * rpm_window_s / 60)) per sliding window
    rpm_window_s: float = 10.0
    retry_after: str = "header"  # how 429s announce the wait: header | body | both | none
    fault_rates: tuple[tuple[str, float], ...] = ()  # random faults: ((kind, probability), ...)
    seed: int = 0  # of the random faults
    fault_retry_after_s: float = 1.0  # the wait injected 429s announce (short, so tests stay fast)

    def validate(self) -> None:
        if self.mime not in ("png", "jpeg", "webp"):
            raise ValueError(f"mime must be png, jpeg or webp, not {self.mime!r}")
        if self.mime != "png" and not pillow_available():
            raise ValueError(f"mime {self.mime!r} needs Pillow, which is not installed")
        if self.retry_after not in _RETRY_AFTER_MODES:
            raise ValueError(f"retry_after must be one of {', '.join(_RETRY_AFTER_MODES)}")
        if self.image_scale < 1 or self.pad_bytes < 0 or self.rpm_limit < 0 or self.rpm_window_s <= 0:
            raise ValueError("image_scale >= 1, pad_bytes >= 0, rpm_limit >= 0, rpm_window_s > 0")
        for kind, rate in self.fault_rates:
            if kind not in FAULT_KINDS or not 0.0 <= rate <= 1.0:
                raise ValueError(f"bad fault rate {kind}={rate}: kinds are {', '.join(FAULT_KINDS)}")
        if sum(rate for _, rate in self.fault_rates) > 1.0:
            raise ValueError("fault rates add up to more than 1")


@dataclass
class _Generation:
    model: str
    prompt: str
    aspect_ratio: str
    size: str
    config_key: str
    digest: bytes


def _bad_request(message: str, param: str | None = None) -> Reply:
    return json_reply(400, mi.error_body(message, "invalid_request_error", "invalid_parameter", param))


def _validate(body: bytes) -> _Generation | Reply:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _bad_request("request body is not valid JSON")
    if not isinstance(data, dict):
        return _bad_request("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or model not in MODELS:
        return _bad_request(f"model {model!r} is not supported; use one of {', '.join(MODELS)}", "model")
    if data.get("stream") not in (None, False):
        return _bad_request("stream must be false for image generation", "stream")
    messages = data.get("messages")
    users = (
        [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] if isinstance(messages, list) else []
    )
    if not users:
        return _bad_request("messages must be a non-empty list with a user message", "messages")
    prompt = users[-1].get("content")
    if not isinstance(prompt, str) or not prompt.strip():
        return _bad_request("the last user message must have non-empty string content", "messages")
    extra = data.get("extra_body") or {}
    google = extra.get("google") or {} if isinstance(extra, dict) else None
    if not isinstance(google, dict):
        return _bad_request("extra_body and extra_body.google must be objects", "extra_body")
    if "imageConfig" in google:
        return _bad_request("unknown field imageConfig in extra_body.google", "extra_body.google.imageConfig")
    config = google.get("image_config") or {}
    if not isinstance(config, dict):
        return _bad_request("image_config must be an object", "extra_body.google.image_config")
    for key in config:
        if key not in ("aspect_ratio", "image_size"):
            return _bad_request(f"unknown field {key!r} in image_config", f"extra_body.google.image_config.{key}")
    info = MODELS[model]
    ratio = config.get("aspect_ratio", "1:1")
    if ratio not in info.aspect_ratios:
        return _bad_request(f"aspect_ratio {ratio!r} is not supported by {model}", "aspect_ratio")
    size = config.get("image_size")
    if info.sizes and size is not None and size not in info.sizes:
        return _bad_request(f"image_size {size!r} is not supported by {model}", "image_size")
    size = effective_size(model, size if info.sizes else None)
    key = json.dumps(config, sort_keys=True)
    digest = hashlib.sha256(f"{model}\n{ratio}\n{size}\n{prompt}".encode()).digest()
    return _Generation(model, prompt, ratio, size, key, digest)


class MockGateway:
    """The mock gateway on its own event loop in a daemon thread.

    `POST /v1/chat/completions` (also without `/v1`) behaves like shared/nanobanana-api.md;
    `GET /mock/stats` returns stats() and `POST /mock/reset` calls reset_stats() (`?faults=1`:
    faults=True), neither needing a key. A prompt containing `[fault:KIND]` always gets that
    fault, `[fault:KINDxN]` only its first N requests with the same prompt, model and
    image_config; the first marker still active wins, so `[fault:503x1][fault:429x1]` gives a
    503, a 429, then an image. Unknown kinds are ignored. Gateway-level faults (_IMMEDIATE)
    answer at once, the rest after the configured latency. `MockConfig.fault_rates` injects the
    same kinds at random (seeded) into requests without an active marker.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._cache = ImageCache()
        self._lock = threading.Lock()
        self._http = BackgroundServer(self._exchange, self._connected, name="mock-gateway")
        self._ids = random.Random()
        self.reset_stats(faults=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        if self._http.started:
            raise RuntimeError("mock gateway already started")
        self.config.validate()
        self._http.start(self.config.host, self.config.port)
        return self.base_url

    def stop(self) -> None:
        self._http.stop()

    def __enter__(self) -> MockGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def base_url(self) -> str:
        return local_url(self.config.host, self.port) + "/v1"

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot. `requests`: POSTs to chat/completions; `generations`: complete 200 answers with
        at least one real image; `by_status`: chat answers by status ("drop"/"truncate" for those
        faults); `in_flight`/`max_in_flight`: chat requests being handled; `by_prompt`, `by_model`,
        `by_fault` (injected faults by kind), `rate_limited` (429s from rpm_limit), `connections`
        (accepted in total), `auth_headers_seen` (sorted distinct Authorization values, any path)."""
        with self._lock:
            s = dict(self._stats)
            for key in ("by_status", "by_prompt", "by_fault", "by_model"):
                s[key] = dict(s[key])
            s["auth_headers_seen"] = sorted(s["auth_headers_seen"])
            return s

    def reset_stats(self, *, faults: bool = False) -> None:
        """Zero the counters; with faults=True also forget markers, the rate window and the RNG."""
        with self._lock:
            in_flight = self._stats["in_flight"] if hasattr(self, "_stats") else 0
            self._stats: dict[str, Any] = {
                "requests": 0, "generations": 0, "by_status": {}, "in_flight": in_flight,
                "max_in_flight": in_flight, "by_prompt": {}, "by_fault": {}, "by_model": {},
                "auth_headers_seen": set(), "rate_limited": 0, "connections": 0,
            }  # fmt: skip
            if faults:
                self._marker_uses: dict[tuple[str, int], int] = {}
                self._window: deque[float] = deque()
                self._rng = random.Random(self.config.seed)

    def _bump(self, group: str, key: str) -> None:
        with self._lock:
            self._stats[group][key] = self._stats[group].get(key, 0) + 1

    def _flight(self, delta: int) -> None:
        with self._lock:
            self._stats["in_flight"] += delta
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])

    # -- HTTP ------------------------------------------------------------------------------
    def _connected(self) -> None:
        with self._lock:
            self._stats["connections"] += 1

    @contextlib.asynccontextmanager
    async def _exchange(self, request: Request, reader: asyncio.StreamReader) -> AsyncIterator[Reply]:
        """Route one request; chat requests count as in flight until their reply is written."""
        path, _, query = request.target.partition("?")
        path = path[3:] if path.startswith("/v1/") else path
        chat = request.method == "POST" and path == "/chat/completions"
        if chat:
            self._flight(1)
        try:
            reply = await self._route(request.method, path, query, request.headers, request.body, reader)
            if chat:
                # Counted before writing: a client that has its answer must already see it in stats().
                with self._lock:
                    key = reply.action if reply.action != "send" else str(reply.status)
                    self._stats["by_status"][key] = self._stats["by_status"].get(key, 0) + 1
                    self._stats["generations"] += reply.paid and reply.action == "send"
            yield reply
        finally:
            if chat:
                self._flight(-1)

    async def _route(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, reader: asyncio.StreamReader
    ) -> Reply:
        auth = headers.get("authorization")
        if auth is not None:
            with self._lock:
                self._stats["auth_headers_seen"].add(auth)
        if path == "/chat/completions" and method == "POST":
            with self._lock:
                self._stats["requests"] += 1
            return await self._chat(auth, body, reader)
        if path == "/mock/stats" and method == "GET":
            return json_reply(200, self.stats())
        if path == "/mock/reset" and method == "POST":
            self.reset_stats(faults="faults=1" in query.split("&"))
            return json_reply(200, {"ok": True})
        if path == "/chat/completions":
            return json_reply(405, mi.error_body(f"method {method} not allowed", "invalid_request_error", 405))
        return json_reply(404, mi.error_body(f"Invalid URL ({method} {path})", "invalid_request_error", "not_found"))

    # -- the gateway -----------------------------------------------------------------------
    def _authorized(self, auth: str | None) -> bool:
        scheme, _, token = (auth or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.config.api_key is None or token == self.config.api_key

    async def _chat(self, auth: str | None, body: bytes, reader: asyncio.StreamReader) -> Reply:
        if not self._authorized(auth):
            return json_reply(401, mi.AUTH_ERROR)
        gen = _validate(body)
        if isinstance(gen, Reply):
            return gen
        self._bump("by_prompt", gen.prompt)
        self._bump("by_model", gen.model)
        limited = self._rate_limit()
        if limited is not None:
            with self._lock:
                self._stats["rate_limited"] += 1
            return self._too_many(limited, self.config.retry_after)
        kind = self._pick_fault(gen)
        if kind is not None:
            self._bump("by_fault", kind)
        if kind not in _IMMEDIATE:
            cfg = self.config
            delay = _SLOW_S if kind == "slow" else cfg.latency_s + random.uniform(0, cfg.latency_jitter_s)
            await sleep_unless_hung_up(delay, reader)
        if kind is None or kind == "slow":
            return self._completion(gen, image_content(await self._image(gen)))
        return await self._fault(kind, gen)

    def _rate_limit(self) -> float | None:
        """None if a request may go now, else the seconds until a slot frees."""
        cfg = self.config
        if cfg.rpm_limit <= 0:
            return None
        capacity = max(1, int(cfg.rpm_limit * cfg.rpm_window_s / 60))
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0] <= now - cfg.rpm_window_s:
                self._window.popleft()
            if len(self._window) >= capacity:
                return self._window[0] + cfg.rpm_window_s - now
            self._window.append(now)
        return None

    def _pick_fault(self, gen: _Generation) -> str | None:
        with self._lock:
            for position, match in enumerate(_MARKER.finditer(gen.prompt)):
                kind, times = match.group(1), match.group(2)
                if kind not in FAULT_KINDS:
                    continue
                if times is None:
                    return kind
                key = (f"{gen.model}\n{gen.config_key}\n{gen.prompt}", position)
                used = self._marker_uses.get(key, 0)
                if used < int(times):
                    self._marker_uses[key] = used + 1
                    return kind
            if self.config.fault_rates:
                draw, total = self._rng.random(), 0.0
                for kind, rate in self.config.fault_rates:
                    total += rate
                    if draw < total:
                        return kind
        return None

    def _too_many(self, wait: float | None, mode: str) -> Reply:
        headers, payload = mi.rate_limited(wait, mode)
        return json_reply(429, payload, headers=headers)

    async def _image(self, gen: _Generation, variant: int = 0) -> bytes:
        cfg = self.config
        width, height = scaled_size(gen.model, gen.aspect_ratio, gen.size, cfg.image_scale)
        seed = gen.digest + bytes([variant])
        return await self._cache.render((gen.digest, variant), width, height, seed, cfg.mime, cfg.pad_bytes)

    def _completion(
        self, gen: _Generation, content: bytes, finish: str = "stop", images: int = 1, paid: bool = True
    ) -> Reply:
        tokens = images * mi.image_tokens(gen.model, gen.size, gen.digest) if images else len(content) // 4
        body = mi.completion(gen.model, gen.prompt, content, finish, tokens, self._ids)
        return Reply(200, body, paid=paid and images > 0)

    async def _fault(self, kind: str, gen: _Generation) -> Reply:
        if kind in mi.FAULT_ERRORS:
            status, payload = mi.FAULT_ERRORS[kind]
            return json_reply(status, payload)
        if kind in ("429", "429_noretry"):
            wait = self.config.fault_retry_after_s if kind == "429" else None
            return self._too_many(wait, self.config.retry_after if kind == "429" else "none")
        if kind == "400_relayed":
            return json_reply(400, mi.relayed_error(self._ids))
        if kind == "drop":
            return Reply(0, action="drop")
        if kind == "truncate":
            return replace(self._completion(gen, image_content(await self._image(gen))), action="truncate")
        if kind == "html":
            return Reply(502, mi.HTML_502, content_type="text/html")
        if kind in ("empty", "badjson"):
            return Reply(200, mi.NOT_JSON if kind == "badjson" else b"")
        if kind == "content_filter":
            text = mi.REFUSAL if gen.digest[1] % 2 else ""
            return self._completion(gen, image_content(text=text), "content_filter", images=0)
        if kind == "text_only":
            return self._completion(gen, image_content(text=mi.TEXT_ONLY), images=0)
        if kind == "not_image":
            uri = data_uri(self.config.mime, not_an_image(gen.digest))
            return self._completion(gen, image_content(uri), paid=False)
        uris = (await self._image(gen), await self._image(gen, 1))  # two_images
        return self._completion(gen, image_content(*uris, text="Here are two versions."), images=2)


def serve(config: MockConfig) -> None:
    """Run in the foreground until Ctrl-C or SIGTERM."""
    gateway = MockGateway(config)
    gateway.start()
    print(f"mock gateway listening on http://{config.host}:{gateway.port}/v1", flush=True)
    try:
        wait_for_interrupt()
    finally:
        gateway.stop()
