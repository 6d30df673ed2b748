"""The run's one HTTP seam: aiohttp directly by default, or any httpx transport (what tests inject).

Both adapters do the same thing, `post(url, body, cap) -> (status, headers, body)`, and turn every
fault of their library into a `Fault` with a failure kind, so the client never sees a library's
exception. aiohttp directly, not through httpx's API: the httpx and httpx-aiohttp layers cost
0.4-0.9 ms of CPU per request, 15-25 points of throughput against a bare loop
(benchmarks/README.md, patch 03).
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

_HEADERS = {"Content-Type": "application/json"}


class Fault(Exception):
    """One request's failure, already classified: `kind` is a policy kind."""

    def __init__(self, kind: str, message: str, status: int | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.kind, self.message, self.status, self.final = kind, message, status, final


def too_big(cap: int, why: str, status: int) -> Fault:
    return Fault(
        "invalid_response",
        f"answer larger than max_response_mb ({cap / 2**20:g} MB): {why}; raise max_response_mb if images are that big",
        status,
        final=True,  # it would come back as big: not retried in this run
    )


class Http(Protocol):
    async def post(self, url: str, content: bytes, cap: int) -> tuple[int, Mapping[str, str], bytes]: ...
    async def aclose(self) -> None: ...


def make_http(
    base_url: str,
    auth_headers: Mapping[str, str],
    timeout_s: float,
    concurrency: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Http:
    """The run's HTTP client for requests under `base_url`, its pool sized to concurrency: aiohttp,
    unless an httpx transport is given (tests, benchmarks) or RUNNER_HTTP_TRANSPORT=httpx. The
    whole request is bounded by the caller's Deadlines (which do not count a stopped process), so
    there is no read timeout here; connecting is bounded by min(timeout_s, 30 s)."""
    headers = {**auth_headers, "User-Agent": "runner"}
    if transport is None and os.environ.get("RUNNER_HTTP_TRANSPORT", "aiohttp") != "httpx":
        return AiohttpHttp(base_url, headers, min(timeout_s, 30.0), concurrency)
    return HttpxHttp(base_url, headers, min(timeout_s, 30.0), concurrency, transport)


def env_proxy(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY name for `url`, read once per run (aiohttp's trust_env
    would look it up, and read ~/.netrc, in a thread on every request)."""
    parsed = httpx.URL(url)
    if parsed.host and urllib.request.proxy_bypass(parsed.host):
        return None
    return urllib.request.getproxies().get(parsed.scheme) or None


class AiohttpHttp:
    def __init__(self, base_url: str, headers: dict[str, str], connect_s: float, concurrency: int) -> None:
        import aiohttp

        self._headers = {**headers, **_HEADERS}
        self._proxy = env_proxy(base_url)
        # certifi's CAs, as httpx uses, for https; loading them costs ~20 ms, so not for plain http
        ssl = httpx.create_ssl_context() if httpx.URL(base_url).scheme == "https" else True
        connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)

    async def post(self, url: str, content: bytes, cap: int) -> tuple[int, Mapping[str, str], bytes]:
        import aiohttp

        status = 0
        try:
            async with self._session.post(
                url, data=content, headers=self._headers, proxy=self._proxy, allow_redirects=False
            ) as resp:
                status = resp.status
                return status, resp.headers, await self._read(resp, cap)
        except Fault:
            raise
        except aiohttp.ClientResponseError as e:  # the status line or a header is malformed
            raise Fault("invalid_response", f"malformed HTTP answer: {e.message or e}") from None
        except aiohttp.ClientPayloadError as e:  # cut off, a bad chunk, a bad gzip stream
            raise Fault("connection", f"the answer's body broke off: {e}", status or None) from None
        except TimeoutError:
            raise Fault("timeout", "could not connect in time") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as e:
            raise Fault("connection", f"{type(e).__name__}: {e}", status or None) from None

    @staticmethod
    async def _read(resp: Any, cap: int) -> bytes:
        """The whole body in one piece when its length is known, never more than `cap` bytes of it
        (counted after decompression, so a gzip bomb stops there too)."""
        length = resp.content_length
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if length is not None and not encoded:
            if length > cap:
                raise too_big(cap, f"it announces {length / 2**20:.0f} MB", resp.status)
            return bytes(await resp.content.readexactly(length))
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > cap:
                raise too_big(cap, "it went on past that", resp.status)
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self._session.close()


class HttpxHttp:
    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        connect_s: float,
        concurrency: int,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=connect_s),
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )

    async def post(self, url: str, content: bytes, cap: int) -> tuple[int, Mapping[str, str], bytes]:
        status = 0
        try:
            async with self._client.stream("POST", url, content=content, headers=_HEADERS) as resp:
                status = resp.status_code
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap and "content-encoding" not in resp.headers:
                    raise too_big(cap, f"it announces {int(declared) / 2**20:.0f} MB", status)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise too_big(cap, "it went on past that", status)
                    chunks.append(chunk)
                return status, resp.headers, b"".join(chunks)
        except Fault:
            raise
        except httpx.TimeoutException as e:
            raise Fault("timeout", f"{type(e).__name__}: {e}") from None
        except (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.DecodingError) as e:
            if any(w in str(e).lower() for w in ("disconnected", "peer closed", "connection reset")):
                raise Fault("connection", f"{type(e).__name__}: {e}", status or None) from None
            raise Fault("invalid_response", f"malformed HTTP answer: {type(e).__name__}: {e}") from None
        except httpx.TransportError as e:  # dropped, refused, cut off mid-body
            raise Fault("connection", f"{type(e).__name__}: {e}", status or None) from None

    async def aclose(self) -> None:
        await self._client.aclose()
