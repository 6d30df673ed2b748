"""The gateway's behaviour, transport aside: auth, validation, rate limit, faults, answers and statistics."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from . import bodies
from .config import MockConfig
from .faults import IMMEDIATE, FaultPicker, RateWindow
from .images import MIN_SIDE, ImageCache, data_uri, not_an_image, render_image, scaled_size
from .validate import Generation, Rejected, parse_request

LOG_SIZE = 10_000
TEXT_KEY = "runner-mock-request"  # the PNG tEXt key holding request_digest()
SAME_IMAGE_DIGEST = hashlib.sha256(b"same_image").hexdigest()
_SLOW_S = 3600.0
_STAT_GROUPS = ("by_status", "by_prompt", "by_fault", "by_model")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    action: str = "send"  # send | drop | truncate
    paid: bool = False  # a complete answer with a real image: counted in stats["generations"]


def json_reply(status: int, payload: dict[str, Any], **kw: Any) -> Reply:
    return Reply(status, json.dumps(payload).encode(), **kw)


class Gateway:
    """Answers chat requests as shared/nanobanana-api.md says (or as LiteLLM would, per the flavour).

    A prompt containing `[fault:KIND]` always gets that fault, `[fault:KINDxN]` only its first N
    requests with the same request digest (model, prompt, image config, inputs, parameters); the
    first marker still active wins, so `[fault:503x1][fault:429x1]` gives a 503, a 429, then an
    image. Unknown kinds are ignored. Gateway-level faults (IMMEDIATE) answer at once, the rest
    after the configured latency. `MockConfig.fault_rates` injects the same kinds at random
    (seeded) into requests without an active marker. Thread-safe: stats are read from any thread.
    """

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self._format = config.effective_answer_format
        self._cache = ImageCache()
        self._lock = threading.Lock()
        self._ids = random.Random()
        self._faults = FaultPicker(config.fault_rates, config.seed)
        self._window = RateWindow(config.rpm_limit, config.rpm_window_s)
        self._log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self._stats: dict[str, Any] = {"in_flight": 0}
        self.reset_stats(faults=True)

    # -- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot. `requests`: POSTs to chat/completions; `generations`: complete 200 answers with
        at least one real image; `by_status`: chat answers by status ("drop"/"truncate" for those
        faults); `in_flight`/`max_in_flight`: chat requests being handled; `by_prompt`, `by_model`,
        `by_fault` (injected faults by kind), `rate_limited` (429s from rpm_limit), `connections`
        (accepted in total), `auth_headers_seen` (sorted distinct Authorization values, any path);
        `requests_log`: the last LOG_SIZE chat requests, oldest first, each {model, prompt,
        image_config (as read, or null), config_from ("extra_body"|"top_level"|null), inputs
        (sha256 hex or URL per reference image, in order), params, status (0: no answer, the
        connection was dropped or the client hung up), fault (kind or null)}; fields the request
        never got to (it was refused first) are null or empty."""
        with self._lock:
            s = dict(self._stats)
            for key in _STAT_GROUPS:
                s[key] = dict(s[key])
            s["auth_headers_seen"] = sorted(s["auth_headers_seen"])
            s["requests_log"] = [{**e, "inputs": list(e["inputs"]), "params": dict(e["params"])} for e in self._log]
            return s

    def reset_stats(self, *, faults: bool = False) -> None:
        """Zero the counters and the log; with faults=True also forget markers, the rate window and the RNG."""
        with self._lock:
            in_flight = self._stats["in_flight"]
            self._stats = {
                "requests": 0, "generations": 0, "by_status": {}, "in_flight": in_flight,
                "max_in_flight": in_flight, "by_prompt": {}, "by_fault": {}, "by_model": {},
                "auth_headers_seen": set(), "rate_limited": 0, "connections": 0,
            }  # fmt: skip
            self._log.clear()
        if faults:
            self._faults.reset()
            self._window.reset()

    def _bump(self, group: str, key: str) -> None:
        with self._lock:
            self._stats[group][key] = self._stats[group].get(key, 0) + 1

    def flight(self, delta: int) -> None:
        with self._lock:
            self._stats["in_flight"] += delta
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])

    def connected(self) -> None:
        with self._lock:
            self._stats["connections"] += 1

    def saw_auth(self, auth: str) -> None:
        with self._lock:
            self._stats["auth_headers_seen"].add(auth)

    # -- chat ------------------------------------------------------------------------------
    async def chat(self, auth: str | None, body: bytes | None) -> Reply:
        """The answer to one chat request (`body` None: it was over the size limit), counted in the
        stats before it is returned: a client that has its answer must already see it there."""
        return await self.counted(lambda entry: self._chat(auth, body, entry))

    async def counted(self, answer: Callable[[dict[str, Any]], Awaitable[Reply]]) -> Reply:
        """One generation request (chat, or Google's generateContent) answered by `answer(entry)`,
        counted and logged the one way; `entry` is its requests_log line, filled as far as it gets."""
        entry: dict[str, Any] = {
            "model": None, "prompt": None, "image_config": None, "config_from": None,
            "inputs": [], "params": {}, "status": 0, "fault": None,
        }  # fmt: skip
        with self._lock:
            self._stats["requests"] += 1
        reply: Reply | None = None
        try:
            reply = await answer(entry)
            return reply
        finally:
            with self._lock:
                if reply is not None:
                    key = str(reply.status) if reply.action == "send" else reply.action
                    self._stats["by_status"][key] = self._stats["by_status"].get(key, 0) + 1
                    self._stats["generations"] += reply.paid and reply.action == "send"
                    entry["status"] = 0 if reply.action == "drop" else reply.status
                self._log.append(entry)

    def _authorized(self, auth: str | None) -> bool:
        scheme, _, token = (auth or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.config.api_key is None or token == self.config.api_key

    async def _chat(self, auth: str | None, body: bytes | None, entry: dict[str, Any]) -> Reply:
        if body is None:
            return json_reply(413, bodies.TOO_LARGE)
        if not self._authorized(auth):
            return json_reply(401, bodies.AUTH_ERROR)
        try:
            flavor = (
                "nanobanana" if self.config.flavor == "gemini" else self.config.flavor
            )  # gemini: chat stays the gateway's
            gen = parse_request(body, flavor, entry)
        except Rejected as exc:
            return json_reply(exc.status, exc.body)
        wait = self.admit(gen)
        if wait is not None:
            return self._too_many(wait, self.config.retry_after)
        kind = await self.fault_for(gen, entry)
        if kind is None or kind == "slow":
            return await self._answer(gen)
        return await self._fault(kind, gen)

    def admit(self, gen: Generation) -> float | None:
        """Count the request's prompt and model; the seconds until a slot when the rate limit refuses it."""
        self._bump("by_prompt", gen.prompt)
        self._bump("by_model", gen.model)
        wait = self._window.admit()
        if wait is not None:
            with self._lock:
                self._stats["rate_limited"] += 1
        return wait

    async def fault_for(self, gen: Generation, entry: dict[str, Any]) -> str | None:
        """The fault this request gets (markers, then the rates), after the generation latency
        unless it is a gateway-level refusal."""
        kind = entry["fault"] = self._faults.pick(gen.prompt, gen.digest.hex())
        if kind is not None:
            self._bump("by_fault", kind)
        if kind not in IMMEDIATE:
            cfg = self.config
            delay = _SLOW_S if kind == "slow" else cfg.latency_s + random.uniform(0, cfg.latency_jitter_s)
            if delay > 0:
                # A client that hangs up cancels this (aiohttp's handler_cancellation): nothing lingers.
                await asyncio.sleep(delay)
        return kind

    def pick_fault(self, prompt: str, key: str) -> str | None:
        """A fault for one line of a batch (markers, then the rates), counted like a request's."""
        kind = self._faults.pick(prompt, key)
        if kind is not None:
            self._bump("by_fault", kind)
        return kind

    def _too_many(self, wait: float | None, mode: str) -> Reply:
        if self.config.flavor == "openai-compatible":
            return json_reply(429, bodies.rate_limited_relayed(None if mode == "none" else wait))
        headers, payload = bodies.rate_limited(wait, mode)
        return json_reply(429, payload, headers=headers)

    # -- answers ---------------------------------------------------------------------------
    async def image(self, gen: Generation, variant: str = "") -> bytes:
        """The data URI of the request's image; a variant is another image for the same request."""
        cfg = self.config
        width, height = scaled_size(gen.model, gen.aspect_ratio, gen.size, cfg.image_scale)
        seed, digest, key = gen.digest + variant.encode(), gen.digest.hex(), (gen.digest, variant)
        if variant == "same_image":  # a broken upstream: one image for every request of a shape
            seed, digest, key = b"same_image", SAME_IMAGE_DIGEST, (f"{width}x{height}".encode(), variant)
        elif variant == "wrong_shape":
            width, height = (width, max(MIN_SIDE, width // 2)) if width == height else (height, width)

        def make() -> bytes:
            text = {TEXT_KEY: digest}
            image = render_image(width, height, seed, cfg.mime, cfg.pad_bytes, uniform=variant == "uniform", text=text)
            return data_uri(cfg.mime, image)

        return await self._cache.render(key, make, big=width * height > 500_000 or cfg.pad_bytes > 1 << 20)

    def _completion(
        self, gen: Generation, uris: list[bytes], text: str = "", finish: str = "stop", paid: bool = True
    ) -> Reply:
        count = len(uris)
        tokens = count * bodies.image_tokens(gen.model, gen.size, gen.digest) if count else len(text) // 4
        body = bodies.completion(gen.model, gen.prompt, uris, text, finish, tokens, self._ids, self._format)
        return Reply(200, body, paid=paid and count > 0)

    async def _answer(self, gen: Generation, variant: str = "", text: str = "") -> Reply:
        if gen.text_only:  # openai-compatible, modalities without "image"
            return self._completion(gen, [], text or bodies.TEXT_ONLY)
        return self._completion(gen, [await self.image(gen, variant)], text)

    async def _fault(self, kind: str, gen: Generation) -> Reply:
        if kind in bodies.FAULT_ERRORS:
            status, payload = bodies.FAULT_ERRORS[kind]
            return json_reply(status, payload)
        if kind in ("429", "429_noretry"):
            wait = self.config.fault_retry_after_s if kind == "429" else None
            return self._too_many(wait, self.config.retry_after if kind == "429" else "none")
        if kind == "400_relayed":
            return json_reply(400, bodies.relayed_error(self._ids))
        if kind == "drop":
            return Reply(0, action="drop")
        if kind == "truncate":
            return replace(await self._answer(gen), action="truncate")
        if kind == "html":
            return Reply(502, bodies.HTML_502, content_type="text/html")
        if kind in ("empty", "badjson"):
            return Reply(200, bodies.NOT_JSON if kind == "badjson" else b"")
        if kind == "content_filter":
            return self._completion(gen, [], bodies.REFUSAL if gen.digest[1] % 2 else "", "content_filter")
        if kind == "text_only":
            return self._completion(gen, [], bodies.TEXT_ONLY)
        if kind == "not_image":
            return self._completion(gen, [data_uri(self.config.mime, not_an_image(gen.digest))], paid=False)
        if kind in ("same_image", "wrong_shape", "uniform"):
            return await self._answer(gen, kind)
        if kind == "unicode":
            return await self._answer(gen, text=bodies.UNICODE_TEXT)
        if kind == "gzip":
            reply = await self._answer(gen)
            packed = await asyncio.get_running_loop().run_in_executor(None, gzip.compress, reply.body, 1)
            return replace(reply, body=packed, headers=(("Content-Encoding", "gzip"),))
        uris = [await self.image(gen), await self.image(gen, "1")]  # two_images
        return self._completion(gen, uris, bodies.TWO_IMAGES)
