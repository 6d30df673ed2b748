"""The mock gateway over HTTP: an aiohttp.web app on an event loop of its own in a daemon thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

from aiohttp import web

from . import bodies
from .config import MockConfig
from .gateway import Gateway, Reply, json_reply
from .gemini_api import GoogleAPI
from .validate import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

# How long stop() lets a request in flight finish before cancelling it (aiohttp waits this twice at most).
_SHUTDOWN_GRACE_S = 0.1


class _QuietLog(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """aiohttp's per-connection logger with every record demoted to debug: malformed or hostile
    traffic is the mock's everyday input, not an error. The mock's own failures use `log`."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class MockGateway:
    """The mock gateway (see Gateway) served by aiohttp on its own event loop in a daemon thread.

    `POST /v1/chat/completions` (also without `/v1`) behaves like shared/nanobanana-api.md, or like
    LiteLLM in front of Gemini with `MockConfig(flavor="openai-compatible")`; `GET /mock/stats`
    returns stats() and `POST /mock/reset` calls reset_stats() (`?faults=1`: faults=True), neither
    needing a key. Bodies over 20 MB get the gateway's 413.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._gateway = Gateway(self.config)
        self._google: GoogleAPI | None = None  # made at start: it holds a folder for uploaded files
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        """Listen (bind errors are raised here) and return the base URL."""
        if self._thread is not None:
            raise RuntimeError("mock gateway already started")
        self.config.validate()
        self._google = GoogleAPI(self.config, self._gateway)
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, errors), name="mock-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            self._google.close()
            raise errors[0]
        return self.base_url

    def stop(self) -> None:
        """Close the listener and every connection; requests in flight are cut after a short grace."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._thread = self._loop = self._runner = self._listener = None
        if self._google is not None:
            self._google.close()

    def __enter__(self) -> MockGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """Where a client of the configured flavour points: `/v1` for the chat shapes, `/v1beta` for Google's."""
        return local_url(self.config.host, self.port) + ("/v1beta" if self.config.flavor == "gemini" else "/v1")

    @property
    def root_url(self) -> str:
        """The server itself (google-genai's `base_url` is this: it adds `/v1beta`, `/upload/v1beta`, ...)."""
        return local_url(self.config.host, self.port)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters and the requests log (keys: see Gateway.stats), and under
        `google` the Files and Batch APIs' (see batches.BatchService.snapshot, plus `key_in_url`)."""
        return {**self._gateway.stats(), "google": self._google.stats() if self._google else {}}

    def reset_stats(self, *, faults: bool = False) -> None:
        """Zero the counters and the log; with faults=True also forget markers, the rate window and the RNG."""
        self._gateway.reset_stats(faults=faults)
        if self._google is not None:
            self._google.reset_stats()

    # -- the event loop thread -------------------------------------------------------------
    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, ctx: log.debug("mock gateway: %s", ctx.get("message")))
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, handler_args={"logger": _QuietLog(log, {})})
        # Exact paths first (a dict lookup in aiohttp's router), then everything else for the JSON 404/405.
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._handle)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            # aiohttp's supported way to notice a client that hangs up: its handler task is cancelled.
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
        )
        try:
            loop.run_until_complete(runner.setup())
            server = runner.server
            assert server is not None

            def protocol() -> asyncio.Protocol:
                # What web.TCPSite does, plus counting every accepted connection (even one that never sends).
                self._gateway.connected()
                return server()

            listen = loop.create_server(protocol, self.config.host, self.config.port, backlog=4096)
            self._listener = loop.run_until_complete(listen)
            self._port = self._listener.sockets[0].getsockname()[1]
            self._loop, self._runner = loop, runner
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(Exception):
                loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- HTTP ------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ConnectionError:
            raise  # the client went away: aiohttp lets it go quietly
        except Exception:
            # aiohttp's own log is demoted to debug (_QuietLog): the mock's failures must still show.
            log.exception("mock gateway: failed to answer %s %s", request.method, request.path)
            raise

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        path = path[3:] if path.startswith("/v1/") else path
        auth = request.headers.get("Authorization")
        if auth is not None:
            self._gateway.saw_auth(auth)
        if GoogleAPI.serves(request.path) and self._google is not None:
            generating = request.method == "POST" and request.path.endswith(":generateContent")
            if generating:
                self._gateway.flight(1)
            try:
                answer = await self._google.handle(request)
            finally:
                if generating:
                    self._gateway.flight(-1)
            return answer if isinstance(answer, web.StreamResponse) else await self._send(request, answer)
        if path == "/chat/completions" and request.method == "POST":
            self._gateway.flight(1)
            try:
                return await self._send(request, await self._gateway.chat(auth, await _read_body(request)))
            finally:
                self._gateway.flight(-1)
        if path == "/mock/stats" and request.method == "GET":
            reply = json_reply(200, self.stats())
        elif path == "/mock/reset" and request.method == "POST":
            self.reset_stats(faults=request.query.get("faults") == "1")
            reply = json_reply(200, {"ok": True})
        elif path == "/chat/completions":
            error = bodies.error_body(f"method {request.method} not allowed", "invalid_request_error", 405)
            reply = json_reply(405, error)
        else:
            message = f"Invalid URL ({request.method} {path})"
            reply = json_reply(404, bodies.error_body(message, "invalid_request_error", "not_found"))
        return await self._send(request, reply)

    async def _send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        """Write the reply inside the handler, so a chat request counts as in flight until it is written."""
        transport = request.transport
        if reply.action == "drop":
            if transport is not None:
                transport.close()
            return web.Response(status=204)  # never written: the connection is gone
        headers = {"Content-Type": reply.content_type, **dict(reply.headers)}
        body, truncate = reply.body, reply.action == "truncate"
        if len(body) < 65536 and not truncate:
            response = web.Response(status=reply.status, body=body, headers=headers)  # one send
            await response.prepare(request)
            await response.write_eof()
            return response
        # Headers on their own, then the body: joining them would copy a multi-megabyte body.
        stream = web.StreamResponse(status=reply.status, headers=headers)
        stream.content_length = len(body)
        await stream.prepare(request)
        await stream.write(body[: len(body) // 2] if truncate else body)
        if truncate:
            if transport is not None:
                transport.close()
            return stream
        await stream.write_eof()
        return stream


async def _read_body(request: web.Request) -> bytes | None:
    """The request body, or None when it is over MAX_REQUEST_BYTES (aiohttp then reads the rest away)."""
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        return None
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, no Content-Length up front
        return None


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


def serve(config: MockConfig) -> None:
    """Run in the foreground until Ctrl-C or SIGTERM."""
    gateway = MockGateway(config)
    gateway.start()
    print(f"mock gateway listening on {gateway.base_url}", flush=True)
    try:
        wait_for_interrupt()
    finally:
        gateway.stop()
