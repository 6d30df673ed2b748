"""Minimal HTTP/1.1 serving for the mock gateway: keep-alive connections on a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from . import mockimages as mi

log = logging.getLogger(__name__)

_MAX_BODY = 32 << 20


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    action: str = "send"  # send | drop | truncate
    paid: bool = False  # a complete answer with a real image: counted in stats["generations"]
    close: bool = False


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


# Entered once per request with the client's reader (so slow handlers can notice a hang-up); the
# reply is written inside the context, which lets the handler account for the whole exchange.
Exchange = Callable[[Request, asyncio.StreamReader], AbstractAsyncContextManager[Reply]]


def json_reply(status: int, payload: dict, **kw: Any) -> Reply:
    return Reply(status, json.dumps(payload).encode(), **kw)


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | Reply | None:
    """The next request; a Reply when it must be refused (then close), None at a clean end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        return json_reply(431, mi.error_body("request headers too large", "invalid_request_error", 431), close=True)
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    malformed = json_reply(400, mi.error_body("malformed HTTP request", "invalid_request_error", 400), close=True)
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return malformed
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name.strip() != name:
            return malformed
        headers[name.lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    length = headers.get("content-length", "0")
    # Clients of a JSON API send Content-Length; chunked uploads are refused rather than half-supported.
    if not length.isdigit() or "transfer-encoding" in headers:
        return malformed
    if int(length) > _MAX_BODY:
        return json_reply(413, mi.FAULT_ERRORS["413"][1], close=True)
    payload = await reader.readexactly(int(length))
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (parts[2] == "HTTP/1.1" or "keep-alive" in connection)
    return Request(parts[0], parts[1], headers, payload, keep_alive)


async def write_reply(writer: asyncio.StreamWriter, reply: Reply, keep_alive: bool) -> bool:
    """Write the reply as its action says; False when the connection must close."""
    if reply.action == "drop":
        return False
    body = reply.body
    lines = [f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}"]
    lines += [f"Content-Type: {reply.content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    head = "\r\n".join(lines).encode("latin-1")
    if reply.action == "truncate":
        writer.write(head + body[: len(body) // 2])
    elif len(body) < 65536:
        writer.write(head + body)
    else:
        # Two writes rather than one concatenation: no copy of a multi-megabyte image.
        writer.write(head)
        writer.write(body)
    await writer.drain()
    return reply.action == "send"


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    """Answer requests on one connection until either side closes it; never raises."""
    try:
        while True:
            request = await read_request(reader, writer)
            if request is None:
                break
            if isinstance(request, Reply):
                await write_reply(writer, request, False)
                break
            async with exchange(request, reader) as reply:
                keep_alive = request.keep_alive and not reply.close
                if not await write_reply(writer, reply, keep_alive) or not keep_alive:
                    break
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
        pass
    except Exception:
        log.debug("mock gateway: connection failed", exc_info=True)
    finally:
        writer.close()


async def sleep_unless_hung_up(seconds: float, reader: asyncio.StreamReader) -> None:
    """Sleep, but give up early when the client hangs up (a timed-out client must not linger)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.25))
        if reader.at_eof():
            raise ConnectionResetError("client went away")


def local_url(host: str, port: int) -> str:
    """`http://host:port` that a client on this machine can reach, even for a wildcard bind."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stopping = threading.Event()
    previous = None
    with contextlib.suppress(ValueError):  # signal handlers only exist in the main thread
        previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """Serves an Exchange on an event loop of its own in a daemon thread, so blocking callers can use it."""

    def __init__(self, exchange: Exchange, on_connect: Callable[[], None], name: str) -> None:
        self._exchange = exchange
        self._on_connect = on_connect
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self.port = 0

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, host: str, port: int) -> None:
        """Listen on host:port (0: a free one, then in self.port); bind errors are raised here."""
        ready = threading.Event()
        errors: list[BaseException] = []
        args = (host, port, ready, errors)
        self._thread = threading.Thread(target=self._run, args=args, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._thread = self._loop = self._server = None

    def _run(self, host: str, port: int, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, ctx: log.debug("mock gateway: %s", ctx.get("message")))
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._connection, host, port, backlog=4096))
            self.port = self._server.sockets[0].getsockname()[1]
            self._loop = loop
        except BaseException as exc:
            errors.append(exc)
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked so that stop() can cancel connections parked in keep-alive or in a slow reply.
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        self._on_connect()
        try:
            await serve_connection(reader, writer, self._exchange)
        finally:
            self._conns.discard(task)  # type: ignore[arg-type]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._conns)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await asyncio.sleep(0)
