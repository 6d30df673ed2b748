"""The run's one HTTP seam: aiohttp directly by default, or any httpx transport (what tests inject).

Both adapters do the same thing, `post(url, body, cap) -> (status, headers, body)`, and turn every
fault of their library into a `Fault` with a failure kind, so the client never sees a library's
exception. aiohttp directly, not through httpx's API: the httpx and httpx-aiohttp layers cost
0.4-0.9 ms of CPU per request, 15-25 points of throughput against a bare loop
(benchmarks/README.md, patch 03).
"""

from __future__ import annotations

import asyncio
import errno
import io
import ipaddress
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from ..errors import UsageError

_HEADERS = {"Content-Type": "application/json"}
_LARGE_BODY = 1 << 20


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


def certificate_fault(url: str, error: BaseException) -> Fault:
    """A certificate that cannot be verified: no retry helps, every request would fail alike (an abort)."""
    host = httpx.URL(url).host
    why = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
    return Fault(
        "certificate",
        f"the TLS certificate of {host} could not be verified ({why}); if the gateway uses a private CA, "
        "point SSL_CERT_FILE at its certificate (a PEM file) or SSL_CERT_DIR at a folder of them",
    )


def fd_hint(e: BaseException) -> str:
    """What a connection error owes to the process's open-file limit, said plainly."""
    if _cause(e, OSError, lambda x: getattr(x, "errno", None) in (errno.EMFILE, errno.ENFILE)) is None:
        return ""
    from ..fdlimit import describe

    return f" ({describe()})"


def _cause(e: BaseException, kind: type[BaseException], test: Any = None) -> Any:
    """The first exception of `kind` (passing `test`) in e's chain of causes and contexts, or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kind) and (test is None or test(x)):
            return x
        stack += [x.__cause__, x.__context__, getattr(x, "os_error", None)]
    return None


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


def check_env(base_url: str) -> None:
    """The environment's network settings for requests to `base_url`, checked before anything is
    sent: a proxy URL that cannot work and CA settings that name no certificates are usage errors
    (exit 2) naming the variable, not a failure of every item."""
    env_proxy(base_url)
    if httpx.URL(base_url).scheme == "https":
        ssl_context()


def env_proxy(url: str) -> str | None:
    """The proxy for `url` from http_proxy / https_proxy / all_proxy (lower case first, as curl and
    urllib read them) unless no_proxy says otherwise, read once per run (aiohttp's trust_env would
    look it up, and read ~/.netrc, in a thread on every request). Loopback never goes through a
    proxy (the built-in mock of --mock is on this machine). A value without a scheme is http://, as
    curl and requests read it; anything but an http(s) proxy is a UsageError naming the variable."""
    parsed = httpx.URL(url)
    host = parsed.host
    if not host or is_loopback(host) or urllib.request.proxy_bypass(host):
        return None
    for name in (f"{parsed.scheme}_proxy", f"{parsed.scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        value = os.environ.get(name, "").strip()
        if value:
            return _proxy_url(name, value)
    return None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _proxy_url(name: str, value: str) -> str:
    url = value if "://" in value else "http://" + value
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"{name}={_redacted(value)}: not a proxy URL ({e}); fix or unset it") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(
            f"{name}={_redacted(value)}: runner speaks to http:// and https:// proxies only, not {parts.scheme}://; "
            "use an HTTP proxy, or unset it (no_proxy=HOST skips it for one host)"
        )
    if not parts.hostname or port == 0:
        raise UsageError(f"{name}={_redacted(value)}: not a proxy URL (no host, or port 0); fix or unset it")
    return url


def _redacted(value: str) -> str:
    """A proxy URL as it may be printed: its user and password never."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{path}"


# Where OpenSSL, and Python's ssl, look for the CAs to trust; REQUESTS_CA_BUNDLE as users of requests set it.
CA_FILE_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def ssl_context() -> ssl.SSLContext:
    """The context for https requests: certifi's CAs (as httpx uses), unless the environment names
    others: SSL_CERT_FILE (a PEM file) and/or SSL_CERT_DIR (folders of hashed PEM files, separated
    by ':'), as OpenSSL reads them; else REQUESTS_CA_BUNDLE (a PEM file), as requests reads it. A
    file that is missing, unreadable or holds no certificate, or a folder that is not one, is a
    UsageError naming the variable and the path."""
    cafile_var = "SSL_CERT_FILE" if os.environ.get("SSL_CERT_FILE") else None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile_var is None and capath is None and os.environ.get("REQUESTS_CA_BUNDLE"):
        cafile_var = "REQUESTS_CA_BUNDLE"
    if cafile_var is None and capath is None:
        return httpx.create_ssl_context(trust_env=False)
    for folder in (capath or "").split(os.pathsep):
        if folder and not os.path.isdir(folder):
            raise UsageError(
                f"SSL_CERT_DIR={capath}: {folder} is not a folder; it names folders of the CA certificates to trust "
                "for https (hashed PEM files, see `openssl rehash`): fix or unset it"
            )
    cafile = os.environ[cafile_var] if cafile_var else None
    try:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ValueError) as e:
        if isinstance(e, ssl.SSLError):
            why = f"holds no PEM certificate ({e.reason or e})"
        elif isinstance(e, FileNotFoundError):
            why = "no such file"
        else:
            why = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        raise UsageError(
            f"{cafile_var}={cafile}: {why}; it names the CA certificates to trust for https (a PEM file): "
            "fix it, or unset it to trust the usual public CAs"
        ) from None


class AiohttpHttp:
    def __init__(self, base_url: str, headers: dict[str, str], connect_s: float, concurrency: int) -> None:
        import aiohttp

        self._headers = {**headers, **_HEADERS}
        self._proxy = env_proxy(base_url)
        # certifi's CAs (or the environment's), for https; loading them costs ~20 ms, so not for plain http
        context = ssl_context() if httpx.URL(base_url).scheme == "https" else True
        connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)

    async def post(self, url: str, content: bytes, cap: int) -> tuple[int, Mapping[str, str], bytes]:
        import aiohttp

        status = 0
        # Past 1 MiB (big reference images, a huge prompt) aiohttp writes a BytesIO in chunks, yielding
        # to the loop between them; raw bytes that big it writes at once and warns about.
        data: bytes | io.BytesIO = content if len(content) <= _LARGE_BODY else io.BytesIO(content)
        try:
            async with self._session.post(
                url, data=data, headers=self._headers, proxy=self._proxy, allow_redirects=False
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
        except aiohttp.ClientConnectorCertificateError as e:
            raise certificate_fault(url, e.certificate_error) from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as e:
            raise Fault("connection", f"{type(e).__name__}: {e}{fd_hint(e)}", status or None) from None

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
        https = transport is None and httpx.URL(base_url).scheme == "https"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=connect_s),
            limits=limits,
            transport=transport,
            follow_redirects=False,
            # The environment read once, as for aiohttp: the same proxy rules (loopback never proxied), the same CAs.
            trust_env=False,
            proxy=env_proxy(base_url) if transport is None else None,
            verify=ssl_context() if https else True,
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
            cause = _cause(e, ssl.SSLCertVerificationError)
            if cause is not None:
                raise certificate_fault(url, cause) from None
            raise Fault("connection", f"{type(e).__name__}: {e}{fd_hint(e)}", status or None) from None

    async def aclose(self) -> None:
        await self._client.aclose()
