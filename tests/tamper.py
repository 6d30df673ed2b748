"""A proxy on 127.0.0.1 in front of the mock's Google API that rewrites chosen answers: the
misbehaving Google of the batch tests (a lost name, a 404 for a live batch, a list that loops).

`tamper(method, path, status, body)` sees every answer (path with its query) and returns
(status, body) to send instead (or (status, body, headers): headers set over the answer's), or
None to pass it on as it came; `refuse(method, path)` answers
(status, body) in the mock's place, the request never reaching it (status 0: the connection is
dropped, no answer at all), or None to forward it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import aiohttp
from aiohttp import web

Tamper = Callable[[str, str, int, bytes], tuple[int, bytes] | tuple[int, bytes, dict[str, str]] | None]
Refuse = Callable[[str, str], tuple[int, bytes] | None]
_HOP = {"host", "content-length", "transfer-encoding", "content-encoding", "connection", "date", "server"}


class TamperProxy:
    def __init__(self, upstream_root: str, tamper: Tamper, refuse: Refuse | None = None) -> None:
        self.upstream = upstream_root.rstrip("/")
        self.tamper = tamper
        self.refuse = refuse
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1beta"

    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),), daemon=True)
        self._thread.start()
        ready.wait(30)
        return self.base_url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    async def _serve(self, ready: threading.Event) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def handle(request: web.Request) -> web.Response:
                refused = self.refuse(request.method, request.path_qs) if self.refuse else None
                if refused is not None and refused[0] == 0 and request.transport is not None:
                    request.transport.abort()
                if refused is not None:
                    return web.Response(status=refused[0] or 500, body=refused[1])
                headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
                async with session.request(
                    request.method, self.upstream + request.path_qs, data=await request.read(), headers=headers,
                    allow_redirects=False,
                ) as resp:  # fmt: skip
                    body = await resp.read()
                    status = resp.status
                    out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
                    if "X-Goog-Upload-URL" in out:  # as a proxy in front of Google would: the upload comes here too
                        root = self.base_url.removesuffix("/v1beta")
                        out["X-Goog-Upload-URL"] = out["X-Goog-Upload-URL"].replace(self.upstream, root)
                changed = self.tamper(request.method, request.path_qs, status, body)
                if changed is not None:
                    status, body = changed[0], changed[1]
                    out.update(changed[2] if len(changed) == 3 else {})  # type: ignore[misc]
                return web.Response(status=status, body=body, headers=out)

            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            await self._stop.wait()
            await runner.cleanup()
