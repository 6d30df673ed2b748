"""Google's Batch and Files APIs over REST: upload (resumable), create, get, list, cancel, download (streamed to disk), delete.

Raw REST, not google-genai: the SDK's batch object drops `batchStats` and the operation's
`error`, and its polling loops do not know EXPIRED (shared/gemini-batch-api.md). Every answer
that is not a success becomes an `ApiError` carrying the same Failure an interactive request
would get; a request whose outcome cannot be known (a timeout, a dropped connection, a 5xx
after the server may have acted) is `Unknown`, which the caller resolves by looking, never by
sending again blindly.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from ...gateway.gemini import classify
from ...policy import Failure
from ...safety import clean_message
from ...spec.parse import is_google

MAX_BODY = 16 << 20  # an answer of the Files or Batch API past this is not one: read no further
UPLOAD_CHUNK = 8 << 20  # bytes per resumable-upload request (a multiple of 256 KiB, as Google asks)
TERMINAL_STATES = ("SUCCEEDED", "PARTIALLY_SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")
WITH_RESULTS = ("SUCCEEDED", "PARTIALLY_SUCCEEDED")


class ApiError(Exception):
    """The server answered, and not with a success: `failure` is what the policy table knows."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Unknown(Exception):
    """No answer: the request may or may not have taken effect on the server."""


@dataclass
class BatchInfo:
    """A batch as the REST API describes it (an Operation), read defensively."""

    name: str
    display_name: str
    state: str  # PENDING, RUNNING, SUCCEEDED, PARTIALLY_SUCCEEDED, FAILED, CANCELLED, EXPIRED (prefix removed)
    stats: dict[str, int] = field(default_factory=dict)
    results_file: str | None = None
    error: str | None = None
    created: str | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def parse(cls, obj: Any) -> BatchInfo:
        obj = obj if isinstance(obj, dict) else {}
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        state = str(meta.get("state") or obj.get("state") or "UNKNOWN")
        for prefix in ("BATCH_STATE_", "JOB_STATE_"):
            state = state.removeprefix(prefix)
        stats: dict[str, int] = {}
        raw_stats = meta.get("batchStats")
        for key, value in raw_stats.items() if isinstance(raw_stats, dict) else ():
            try:
                stats[str(key)] = int(value)  # the API sends them as strings
            except (TypeError, ValueError):
                continue
        response = obj.get("response") if isinstance(obj.get("response"), dict) else None
        output = meta.get("output") if isinstance(meta.get("output"), dict) else None
        results = (response or {}).get("responsesFile") or (output or {}).get("responsesFile")
        error = obj.get("error")
        message = clean_message(str(error.get("message", "")), None) if isinstance(error, dict) else None
        return cls(
            name=str(obj.get("name", "")), display_name=str(meta.get("displayName", "")), state=state, stats=stats,
            results_file=results if isinstance(results, str) else None, error=message,
            created=meta.get("createTime") if isinstance(meta.get("createTime"), str) else None,
        )  # fmt: skip


class GoogleBatchApi:
    """The REST calls the batch backend makes, under one `base_url` ({root}/v1beta)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_line_bytes: int = 64 << 20,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.max_line_bytes = max_line_bytes  # a results line (one answer) past this is not read: max_response_mb
        # Uploads and downloads live beside the version ({root}/upload/{version}/files): split the
        # path, never the URL's text (a base_url with no path would put "upload" in the host).
        url = httpx.URL(self.base)
        prefix, _, version = url.path.rstrip("/").rpartition("/")
        if not re.fullmatch(r"v\d+\w*", version):  # no version in the path: Google's, after it
            prefix, version = url.path.rstrip("/"), "v1beta"
        self.root, self.version = str(url.copy_with(path=prefix or "/", query=None)).rstrip("/"), version
        self._key = api_key
        self._timeout_s = timeout_s
        loopback = httpx.URL(self.base).host in ("127.0.0.1", "localhost", "::1")
        self._client = httpx.AsyncClient(
            headers={"x-goog-api-key": api_key, "User-Agent": "runner"},  # never ?key= in a URL: URLs get logged
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            transport=transport,
            follow_redirects=False,
            trust_env=not loopback,  # the loopback mock is never reached through a proxy
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the Files API ------------------------------------------------------------------------
    async def upload(self, path: Path, display_name: str, mime: str = "application/jsonl") -> dict[str, Any]:
        """Upload a file from disk, a chunk at a time (never all of it in memory); its File object."""
        size = path.stat().st_size
        start = await self._send(
            "POST",
            f"{self.root}/upload/{self.version}/files",
            json={"file": {"displayName": display_name}},
            headers={
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(size),
                "X-Goog-Upload-Header-Content-Type": mime,
            },
        )
        url = start.headers.get("x-goog-upload-url")
        if not url:
            raise ApiError(Failure("invalid_response", start.status_code, "the upload was not given a URL"))
        offset = 0
        with path.open("rb") as f:
            while True:
                chunk = f.read(UPLOAD_CHUNK)
                last = offset + len(chunk) >= size
                resp = await self._send(
                    "POST",
                    url,
                    content=chunk,
                    headers={
                        "X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                        "X-Goog-Upload-Offset": str(offset),
                    },
                )
                offset += len(chunk)
                status = resp.headers.get("x-goog-upload-status", "")
                if last or status != "active":
                    break
        body = _json(resp)
        file = body.get("file") if isinstance(body.get("file"), dict) else None
        if status != "final" or file is None or not isinstance(file.get("name"), str):
            raise ApiError(
                Failure("invalid_response", resp.status_code, f"the upload did not finish ({status or 'no status'})")
            )
        return file

    async def upload_bytes(self, data: bytes, display_name: str, mime: str) -> dict[str, Any]:
        """A small file (a reference image) uploaded the same way."""
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="runner-ref-") as tmp:
            tmp.write(data)
            tmp.flush()
            return await self.upload(Path(tmp.name), display_name, mime)

    async def delete_file(self, name: str) -> None:
        resp = await self._send("DELETE", f"{self.base}/{name}", ok=(200, 204, 404))
        del resp

    async def download(self, name: str, dest: Path, max_bytes: int | None = None) -> int:
        """Stream a file's bytes to `dest` (a results file can be gigabytes); returns how many. Past
        `max_bytes` it stops: ApiError (a results file no batch of its size could make)."""
        url = f"{self.root}/download/{self.version}/{name}:download"
        self._own(url)
        size = 0
        try:
            async with self._client.stream("GET", url, params={"alt": "media"}) as resp:
                if resp.status_code != 200:
                    body = await resp.aread()
                    raise ApiError(classify(resp.status_code, body[:20_000], resp.headers, self._key))
                with dest.open("wb") as out:
                    async for chunk in resp.aiter_bytes(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise ApiError(Failure("invalid_response", 200, f"the results file {name} passes "
                                                   f"{max_bytes / 2**20:,.0f} MiB, more than its lines can hold"))  # fmt: skip
                    out.flush()
                    os.fsync(out.fileno())
        except httpx.HTTPError as e:
            raise Unknown(f"download of {name} broke off: {type(e).__name__}: {e}") from None
        return size

    # -- batches ----------------------------------------------------------------------------
    async def create(self, model_id: str, display_name: str, file_name: str) -> BatchInfo:
        """Create a batch over an uploaded input file. Not idempotent: Unknown means look, not retry."""
        body = {"batch": {"displayName": display_name, "inputConfig": {"fileName": file_name}}}
        resp = await self._send(
            "POST", f"{self.base}/models/{model_id}:batchGenerateContent", json=body, unknown_5xx=True
        )
        try:
            info = BatchInfo.parse(_json(resp))
        except ApiError:  # a 200 that is not JSON: the batch may well exist
            info = None
        if info is None or not info.name.startswith("batches/"):  # it cannot be polled by that name: look it up
            raise Unknown(f"POST {_path(str(resp.url))}: the answer names no batch")
        return info

    async def get(self, name: str) -> BatchInfo:
        return BatchInfo.parse(_json(await self._send("GET", f"{self.base}/{name}")))

    async def list(self) -> AsyncIterator[BatchInfo]:
        """Every batch of the project, page by page (the Developer API has no filter: match client-side)."""
        token: str | None = None
        seen: set[str] = set()
        for _ in range(10_000):  # a bound, not a limit anyone meets
            params = {"pageSize": "100", **({"pageToken": token} if token else {})}
            resp = await self._send("GET", f"{self.base}/batches", params=params)
            body = _json(resp)
            operations = body.get("operations")
            for op in operations if isinstance(operations, list) else []:
                yield BatchInfo.parse(op)
            token = body.get("nextPageToken") if isinstance(body.get("nextPageToken"), str) else None
            if not token:
                return
            if token in seen:  # a server paging in a loop: stop now, not after 10,000 requests
                raise ApiError(Failure("invalid_response", resp.status_code, "the list of batches pages in a loop "
                                       "(a page token came back twice)"))  # fmt: skip
            seen.add(token)

    async def cancel(self, name: str) -> None:
        await self._send("POST", f"{self.base}/{name}:cancel", ok=(200, 204))

    # -- one request ------------------------------------------------------------------------
    def _own(self, url: str) -> None:
        """The key goes with every request of this client: only to base_url's host (or Google's own,
        whose upload URL a proxy may hand on), never to a host an answer chose."""
        there, here = httpx.URL(url), httpx.URL(self.base)
        if (there.scheme, there.host, there.port) == (here.scheme, here.host, here.port):
            return
        if is_google(url):
            return
        raise ApiError(
            Failure("invalid_response", None, f"a URL on another host ({there.host}): the key is not sent there")
        )

    async def _send(
        self, method: str, url: str, *, ok: tuple[int, ...] = (200,), unknown_5xx: bool = False, **kwargs: Any
    ) -> httpx.Response:
        self._own(url)
        try:
            with anyio.fail_after(self._timeout_s):  # the whole request, its body included (a trickle too)
                async with self._client.stream(method, url, **kwargs) as streamed:
                    body = bytearray()
                    async for chunk in streamed.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY:
                            raise Unknown(f"{method} {_path(url)}: an answer past {MAX_BODY >> 20} MiB, cut off")
            resp = httpx.Response(streamed.status_code, headers=streamed.headers, content=bytes(body),
                                  request=streamed.request)  # fmt: skip
        except TimeoutError:
            raise Unknown(f"{method} {_path(url)}: no whole answer within {self._timeout_s:g}s") from None
        except httpx.HTTPError as e:
            raise Unknown(f"{method} {_path(url)}: {type(e).__name__}: {e}") from None
        if resp.status_code in ok:
            return resp
        if unknown_5xx and resp.status_code >= 500:
            raise Unknown(f"{method} {_path(url)}: HTTP {resp.status_code}")
        raise ApiError(classify(resp.status_code, resp.content[:20_000], resp.headers, self._key))


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        obj = resp.json()
    except ValueError:
        raise ApiError(Failure("invalid_response", resp.status_code, "the answer is not JSON")) from None
    if not isinstance(obj, dict):
        raise ApiError(Failure("invalid_response", resp.status_code, "the answer is not a JSON object"))
    return obj


def _path(url: str) -> str:
    """A URL for a message: its path only (never a query, where some put keys)."""
    return httpx.URL(url).path


def error_text(e: Exception) -> str:
    """What a failed call said: the server's message, else the exception's."""
    return e.failure.message if isinstance(e, ApiError) else str(e)
