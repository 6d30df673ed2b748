"""A raw HTTP server that misbehaves on demand: the hostile gateway of the hardening tests.

Not an HTTP library: every byte it sends is written by hand, so it can send what no library
would. A POST gets a valid Nano Banana answer (a small PNG that differs per prompt) unless
its prompt carries `[hostile:NAME]`: then scenario NAME answers (see SCENARIOS). The method
and path are not checked; every answer closes its connection.

stats(): `requests` {prompt: n} received, `sent` {prompt: n} answers written in full,
`paid` {prompt: n} of those a 200 with at least one whole image, `held` {prompt: [seconds
from request to the end of the exchange]}, `in_flight`, `auth` (Authorization values seen).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import re
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MARKER = re.compile(r"\[hostile:([a-z0-9_]+)\]")
ESCAPES = "\x1b]0;pwned\x07 \x1b]52;c;aGk=\x07 \x1b[2J\rall good, 0 failed\x9b31m\x00\x08"
USAGE = '{"prompt_tokens": 12, "completion_tokens": 1120, "total_tokens": 1132}'
TRICKLE_S = 0.3
_GIVE_UP_S = 60.0  # the endless and trickling answers stop here even if the client never hangs up


def png(seed: bytes, side: int = 8) -> bytes:
    """A whole RGB PNG whose pixels come from `seed`: different seeds, different images."""
    digest = hashlib.sha256(seed).digest()
    pixels = (digest * (side * side * 3 // len(digest) + 1))[: side * side * 3]
    raw = b"".join(b"\x00" + pixels[y * side * 3 : (y + 1) * side * 3] for y in range(side))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# A PNG signature, then HTML and script, then a PNG's IEND trailer: starts and ends like a PNG, has no IHDR.
POLYGLOT = (
    b"\x89PNG\r\n\x1a\n<html><script>alert(document.cookie)</script></html>" + struct.pack(">I", 0) + b"IEND\xaeB`\x82"
)
# Usage numbers no loader can hold: past int64 either way, a 309-digit and a 5000-digit integer, infinity.
HUGE_USAGE = (
    f'{{"prompt_tokens": {2**63}, "completion_tokens": {10**308}, "total_tokens": {-(2**63) - 1}, '
    f'"thoughts_tokens": {"9" * 5000}, "cached_tokens": 1e999, "image_tokens": 1120}}'
)


def image_md(prompt: str, index: int = 0) -> str:
    return f"![image](data:image/png;base64,{base64.b64encode(png(f'{prompt}#{index}'.encode())).decode()})"


def completion(
    content_json: str, id_json: str = '"chatcmpl-1"', usage_json: str = USAGE, model: str = "nanobanana_pro"
) -> bytes:
    """A chat.completion body from parts given as raw JSON text, so they can hold what json.dumps would not."""
    return (
        f'{{"id": {id_json}, "object": "chat.completion", "created": 1, "model": {json.dumps(model)}, '
        f'"choices": [{{"index": 0, "message": {{"role": "assistant", "content": {content_json}}}, '
        f'"finish_reason": "stop"}}], "usage": {usage_json}}}'
    ).encode()


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": "bad"}}).encode()


def head(status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http(body: bytes, status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    return head(status, (f"Content-Length: {len(body)}", *headers)) + body


@functools.cache
def gzip_bomb(inflated_mib: int = 4096) -> bytes:
    """A gzip body of ~1 KB per MiB it inflates to: one full-flushed deflate block of spaces, repeated.

    After a full flush a deflate block needs no history, so copies of it chain into a valid
    stream; the trailer's CRC is not computed (a client that gets that far has already lost)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(b" " * (1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return header + block * inflated_mib + b"\x03\x00" + struct.pack("<II", 0, (inflated_mib << 20) & 0xFFFFFFFF)


@dataclass
class Exchange:
    prompt: str
    auth: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def hung_up(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()


# A scenario answers one request: True if it sent a paid answer (a 200 with images), False if
# it sent something else in full, None if it never finished (the client hung up first).
Scenario = Callable[[Exchange], Awaitable[bool | None]]


async def _fixed(ex: Exchange, data: bytes, paid: bool = False) -> bool:
    await ex.send(data)
    return paid


def _valid(ex: Exchange, *, text: str = "", id_json: str = '"chatcmpl-1"', usage_json: str = USAGE) -> bytes:
    return http(completion(json.dumps(f"{text}\n{image_md(ex.prompt)}"), id_json, usage_json))


async def default(ex: Exchange) -> bool:
    return await _fixed(ex, _valid(ex), paid=True)


async def _endless(ex: Exchange) -> bool | None:
    """A chunked 200 that never ends, as fast as the client takes it."""
    await ex.send(head(headers=("Transfer-Encoding: chunked",)))
    await ex.send(b'f\r\n{"id": "x", "a"\r\n')
    chunk = b"100000\r\n" + b" " * 0x100000 + b"\r\n"
    end = time.monotonic() + _GIVE_UP_S
    while time.monotonic() < end and not ex.hung_up():
        await ex.send(chunk)
    return None


async def _trickle(ex: Exchange) -> bool | None:
    """Headers at once, then one byte of the body every TRICKLE_S."""
    body = completion(json.dumps(image_md(ex.prompt)))
    await ex.send(head(headers=(f"Content-Length: {len(body)}",)))
    end = time.monotonic() + _GIVE_UP_S
    for i in range(len(body)):
        if ex.hung_up() or time.monotonic() > end:
            return None
        await ex.send(body[i : i + 1])
        await asyncio.sleep(TRICKLE_S)
    return True


async def _gzip(ex: Exchange) -> bool:
    bomb = gzip_bomb()
    await ex.send(head(headers=("Content-Encoding: gzip", f"Content-Length: {len(bomb)}")))
    for i in range(0, len(bomb), 1 << 20):
        await ex.send(bomb[i : i + (1 << 20)])
    return False


def _malformed(start: str, body: bytes = b"") -> Scenario:
    """A status line and headers written as given (CRLF line ends added; {n}: the body's length), then the body."""

    async def answer(ex: Exchange) -> bool:
        payload = body or completion(json.dumps(image_md(ex.prompt)))
        text = start.replace("{n}", str(len(payload))).replace("{m}", str(len(payload) + 7))
        await ex.send(text.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + payload)
        return False

    return answer


def _const(make: Callable[[Exchange], bytes], paid: bool = False) -> Scenario:
    async def answer(ex: Exchange) -> bool:
        return await _fixed(ex, make(ex), paid)

    return answer


def _images(n: int) -> Scenario:
    def make(ex: Exchange) -> bytes:
        return http(completion(json.dumps("\n".join(image_md(ex.prompt, i) for i in range(n)))))

    return _const(make, paid=True)


_OK = "HTTP/1.1 200 OK\nContent-Type: application/json\nConnection: close"

SCENARIOS: dict[str, Scenario] = {
    "default": default,
    # 1. lone UTF-16 surrogates, written as JSON escapes (json.dumps escapes them so)
    "surrogate_text": _const(lambda ex: _valid(ex, text="caption \ud800 end"), paid=True),
    "surrogate_id": _const(lambda ex: _valid(ex, id_json=json.dumps("chatcmpl-\ud800")), paid=True),
    "surrogate_usage": _const(
        lambda ex: _valid(ex, usage_json=json.dumps({"prompt_tokens": 1, "note\udfff": "x\ud800"})), paid=True
    ),
    "surrogate_400": _const(lambda ex: http(error_body("bad \ud800 request"), "400 Bad Request")),
    # 2. malformed HTTP
    "cl_abc": _malformed(_OK + "\nContent-Length: abc"),
    "bad_status": _malformed("HTTZ/1.1 two hundred\nContent-Length: {n}"),
    "bad_chunk": _malformed(_OK + "\nTransfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n"),
    "big_header": _malformed(_OK + "\nContent-Length: {n}\nX-Padding: " + "a" * 128_000),
    "two_cl": _malformed(_OK + "\nContent-Length: {n}\nContent-Length: {m}"),
    "nul_header": _malformed(_OK + "\nContent-Length: {n}\nX-Note: a\x00b"),
    "http2": _malformed("HTTP/2 200\nContent-Type: application/json\nContent-Length: {n}"),
    "short_body": _malformed(_OK + "\nContent-Length: 999999"),
    # 3. memory
    "endless": _endless,
    "gzip_bomb": _gzip,
    # 4. the key echoed back (the Authorization header holds "Bearer KEY")
    "echo_text": _const(lambda ex: _valid(ex, text=f"you sent {ex.auth}"), paid=True),
    "echo_id": _const(lambda ex: _valid(ex, id_json=json.dumps(f"chatcmpl-{ex.auth}")), paid=True),
    "echo_usage": _const(lambda ex: _valid(ex, usage_json=json.dumps({"prompt_tokens": 1, "key": ex.auth})), paid=True),
    "echo_400": _const(lambda ex: http(error_body(f"invalid key {ex.auth}"), "400 Bad Request")),
    # 5. terminal escapes in everything the server says
    "escape_ok": _const(
        lambda ex: _valid(ex, text=ESCAPES, id_json=json.dumps(ESCAPES), usage_json=json.dumps({ESCAPES: ESCAPES})),
        paid=True,
    ),
    "escape_400": _const(lambda ex: http(error_body(ESCAPES), "400 Bad Request")),
    "escape_text_only": _const(lambda ex: http(completion(json.dumps(ESCAPES)))),
    # 6. odd JSON
    "deep_json": _const(lambda ex: http(b'{"id": "d", "choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")),
    "inf_usage": _const(
        lambda ex: _valid(ex, usage_json='{"prompt_tokens": 1e999, "completion_tokens": -1e999, "total_tokens": 1}'),
        paid=True,
    ),
    "choices_dict": _const(lambda ex: http(b'{"id": "c", "choices": {"0": {}}}')),
    "content_number": _const(lambda ex: http(completion("42"))),
    "message_null": _const(lambda ex: http(b'{"id": "m", "choices": [{"index": 0, "message": null}]}')),
    "fake_png": _const(lambda ex: http(completion(json.dumps("![i](data:image/png;base64,bm90IGEgcG5nIGF0IGFsbA==)")))),
    "images10": _images(10),
    "busy3": _const(lambda ex: http(error_body("overloaded"), "503 Service Unavailable", ("Retry-After: 3",))),
    # 7. slow
    "trickle": _trickle,
    # 8. round 3: lies about images and errors, absurd numbers
    "polyglot": _const(lambda ex: http(completion(json.dumps(f"![i](data:image/png;base64,{b64(POLYGLOT)})")))),
    "error200_402": _const(
        lambda ex: http(json.dumps({"error": {"code": 402, "message": "Insufficient credits"}}).encode())
    ),
    "error200_429": _const(
        lambda ex: http(
            json.dumps({"error": {"code": "429", "message": "slow down", "type": "rate_limit_error"}}).encode()
        )
    ),
    "huge_usage": _const(lambda ex: _valid(ex, usage_json=HUGE_USAGE), paid=True),
    "images15": _images(15),
    "other_model": _const(
        lambda ex: http(completion(json.dumps(image_md(ex.prompt)), model="gemini-2.5-flash-image")), paid=True
    ),
    "google_name": _const(
        lambda ex: http(completion(json.dumps(image_md(ex.prompt)), model="models/gemini-3-pro-image-preview")),
        paid=True,
    ),
}
MALFORMED = ("cl_abc", "bad_status", "bad_chunk", "big_header", "two_cl", "nul_header", "http2", "short_body")


def _prompt(body: bytes) -> str:
    """The text of the last user message, '' if there is none."""
    try:
        messages = json.loads(body)["messages"]
        content = [m for m in messages if m.get("role") == "user"][-1]["content"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class HostileServer:
    """The server on its own event loop in a daemon thread; start() returns the base URL (…/v1)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # a server context: the gateway speaks https with its certificate
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.requests: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.paid: dict[str, int] = {}
        self.held: dict[str, list[float]] = {}
        self.in_flight = 0
        self.auth: set[str] = set()
        self.every: str | None = None  # a scenario for every request, whatever its body (a GET has none)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests), "sent": dict(self.sent), "paid": dict(self.paid),
                "held": {k: list(v) for k, v in self.held.items()}, "in_flight": self.in_flight,
                "auth": sorted(self.auth),
            }  # fmt: skip

    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="hostile-gateway", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.base_url

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, _ctx: None)  # a hostile server expects broken pipes
        self._loop = loop
        server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024, ssl=self.tls))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    def _bump(self, counter: dict[str, int], prompt: str) -> None:
        with self._lock:
            counter[prompt] = counter.get(prompt, 0) + 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        prompt, started = None, time.monotonic()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            prompt, auth = _prompt(body), headers.get("authorization", "")
            match = MARKER.search(prompt)
            scenario = SCENARIOS.get(self.every or (match.group(1) if match else "default"), default)
            self._bump(self.requests, prompt)
            with self._lock:
                self.in_flight += 1
                self.auth.add(auth)
            try:
                paid = await scenario(Exchange(prompt, auth, reader, writer))
            finally:
                with self._lock:
                    self.in_flight -= 1
            if paid is not None:
                self._bump(self.sent, prompt)
            if paid:
                self._bump(self.paid, prompt)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            if prompt is not None:
                with self._lock:
                    self.held.setdefault(prompt, []).append(time.monotonic() - started)
            writer.close()
            self._tasks.discard(task)
