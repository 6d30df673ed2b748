"""One request to the gateway: build the body, send it within bounds, and turn the answer into images or a Failure."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Any

import anyio.to_thread
import httpx

from .answer import Outcome, parse_completion
from .deadline import Deadlines
from .inputs import InputError, Inputs
from .items import Item
from .policy import Failure, classify_status, clean_message

# Big answers (a 2K image is a few MB of base64) are parsed off the event loop, and so are
# request bodies that carry big reference images.
THREAD_PARSE_BYTES = 512 * 1024
_HEADERS = {"Content-Type": "application/json"}
_DROPPED = re.compile(r"disconnected|peer closed|connection (reset|closed|aborted)", re.IGNORECASE)


def request_body(item: Item, api_format: str = "nanobanana", image_urls: list[str] | None = None) -> dict[str, Any]:
    """The JSON body of an item's request.

    `nanobanana` is the gateway's documented shape: the image config as a literal
    `extra_body.google.image_config`. `openai-compatible` (LiteLLM, OpenRouter) sends it as a
    top-level `image_config` with `modalities`, since those forward a literal extra_body to
    Google as an unknown field. Reference images make `content` a list of parts, text first."""
    content: str | list[dict[str, Any]] = item.prompt
    if image_urls:
        content = [{"type": "text", "text": item.prompt}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    body: dict[str, Any] = {"model": item.model, "stream": False, "messages": [{"role": "user", "content": content}]}
    if api_format == "openai-compatible":
        body["image_config"] = item.config.as_sent()
        body["modalities"] = ["image", "text"]
    else:
        body["extra_body"] = {"google": {"image_config": item.config.as_sent()}}
    body.update(item.sent_params())
    return body


def make_http_client(
    base_url: str, api_key: str, timeout_s: float, concurrency: int, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The run's one HTTP client, its pool sized to concurrency.

    `transport` is the seam tests and benchmarks use. By default requests go over aiohttp
    (httpx-aiohttp): httpx's own pool scans every connection on every request, which cost
    14 ms of CPU per request at 64 in flight against 2 ms over aiohttp
    (benchmarks/bench_throughput.py). RUNNER_HTTP_TRANSPORT=httpx selects httpx's own.
    The whole request is bounded by Deadlines (which does not count time the process was
    stopped), so httpx's own read timeout is off."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(None, connect=min(timeout_s, 30.0))
    if transport is None and os.environ.get("RUNNER_HTTP_TRANSPORT", "aiohttp") != "httpx":
        transport = _aiohttp_transport(limits, base_url)
    return httpx.AsyncClient(
        base_url=base_url + "/",
        headers={"Authorization": f"Bearer {api_key}", "User-Agent": "runner"},
        timeout=timeout,
        limits=limits,
        transport=transport,
        follow_redirects=False,
    )


def _aiohttp_transport(limits: httpx.Limits, base_url: str) -> httpx.AsyncBaseTransport:
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    # HTTP(S)_PROXY and NO_PROXY are read once here: aiohttp's trust_env reads them, and opens
    # ~/.netrc, in a thread on every request.
    host = httpx.URL(base_url).host
    proxy_url = (
        None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(httpx.URL(base_url).scheme)
    )
    proxy = httpx.Proxy(proxy_url) if proxy_url else None

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=limits.max_connections or 0, ssl=httpx.create_ssl_context())
        return aiohttp.ClientSession(connector=connector, trust_env=False)

    return AiohttpTransport(limits=limits, client=session, proxy=proxy)


class Client:
    """Sends items to `POST {base_url}/chat/completions` and classifies every answer.

    Every fault of one request becomes a Failure of that item: timeouts, dropped connections,
    malformed HTTP, bodies over `max_response_bytes` (counted after decompression, so a gzip
    bomb stops at the cap). What is not a network fault (a bug) is raised, for the pool to
    record as `internal`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        api_key: str | None,
        timeout_s: float,
        *,
        deadlines: Deadlines | None = None,
        max_response_bytes: int = 64 << 20,
        api_format: str = "nanobanana",
        inputs: Inputs | None = None,
    ) -> None:
        self.http = http
        self.url = http.base_url.join("chat/completions")
        self.timeout_s = timeout_s
        self.deadlines = deadlines or Deadlines()
        self.max_response_bytes = max_response_bytes
        self.api_format = api_format
        self.inputs = inputs
        self._key = api_key

    async def generate(self, item: Item) -> Outcome:
        try:
            content = await self._body(item)
        except InputError as e:
            return Failure("bad_request", None, self._msg(str(e)), final=True)
        status, headers = 0, None
        body: bytes | bytearray = b""
        try:
            with self.deadlines.limit(self.timeout_s) as scope:
                async with self.http.stream("POST", self.url, content=content, headers=_HEADERS) as resp:
                    status, headers = resp.status_code, resp.headers
                    body = await self._read(resp)
            if scope.cancelled_caught:
                return Failure("timeout", None, f"no complete answer within {self.timeout_s:g}s")
        except _TooBig as e:
            return Failure("invalid_response", status, str(e), final=True)
        except httpx.TimeoutException as e:
            if not isinstance(e.__cause__, (TimeoutError, type(None))):
                # httpx-aiohttp reports a dropped connection as a ConnectTimeout: say what it was.
                return Failure("connection", None, self._msg(f"{type(e.__cause__).__name__}: {e}"))
            return Failure("timeout", None, self._msg(f"{type(e).__name__}: {e}"))
        except (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.DecodingError) as e:
            if _DROPPED.search(str(e)):  # httpcore says a closed connection this way too
                return Failure("connection", None, self._msg(f"{type(e).__name__}: {e}"))
            return Failure("invalid_response", None, self._msg(f"malformed HTTP answer: {type(e).__name__}: {e}"))
        except httpx.TransportError as e:  # dropped, refused, cut off mid-body
            return Failure("connection", None, self._msg(f"{type(e).__name__}: {e}"))
        except Exception as e:
            failure = _aiohttp_failure(e, self._key)
            if failure is None:
                raise
            return failure
        if status != 200:
            return classify_status(status, bytes(body[:20_000]), headers, self._key)
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(parse_completion, body, self._key)
        return parse_completion(body, self._key)

    async def _body(self, item: Item) -> bytes:
        if not item.inputs:
            return json.dumps(request_body(item, self.api_format), ensure_ascii=False).encode()
        assert self.inputs is not None, "items with reference images need the spec's Inputs"
        inputs = self.inputs

        def build() -> bytes:
            urls = [inputs.data_uri(i) for i in item.inputs]
            return json.dumps(request_body(item, self.api_format, urls), ensure_ascii=False).encode()

        if sum(i.size for i in item.inputs) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(build)
        return build()

    async def _read(self, resp: httpx.Response) -> bytes | bytearray:
        """The whole body, never more than max_response_bytes of it."""
        cap = self.max_response_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap and "content-encoding" not in resp.headers:
            raise _TooBig(_too_big(cap, f"it announces {int(declared) / 2**20:.0f} MB"))
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise _TooBig(_too_big(cap, "it went on past that"))
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _msg(self, text: str) -> str:
        return clean_message(text, self._key)


class _TooBig(Exception):
    pass


def _too_big(cap: int, why: str) -> str:
    return (
        f"answer larger than max_response_mb ({cap / 2**20:g} MB): {why}; raise max_response_mb if images are that big"
    )


def _aiohttp_failure(e: Exception, key: str | None) -> Failure | None:
    """Faults aiohttp raises that httpx-aiohttp does not map to httpx's exceptions."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        return None
    if isinstance(e, aiohttp.ClientResponseError):  # the answer's status line or headers are malformed
        return Failure("invalid_response", None, clean_message(f"malformed HTTP answer: {e}", key))
    if isinstance(e, (aiohttp.ClientError, ConnectionError)):
        return Failure("connection", None, clean_message(f"{type(e).__name__}: {e}", key))
    return None
