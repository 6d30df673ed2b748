"""The mock's Google API over HTTP: routes, the API key, generateContent, the Files and Batch endpoints.

Paths as Google serves them under one root: `/v1beta/models/{id}:generateContent`,
`/v1beta/models/{id}:batchGenerateContent`, `/v1beta/batches[/{id}[:cancel]]`,
`/v1beta/files[/{id}]`, `/upload/v1beta/files` (resumable) and
`/download/v1beta/files/{id}:download?alt=media` (streamed).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
from typing import Any

from aiohttp import web

from . import bodies
from .batches import BatchService
from .batchstate import results_line
from .config import MockConfig
from .gateway import Gateway, Reply, json_reply
from .google import GOOGLE_FAULTS, GoogleError, invalid, line_error, model_of, parse_generate, response_body, retry_info
from .images import data_uri, not_an_image
from .validate import Generation

_MODEL_CALL = re.compile(r"/v1beta/models/([^/:]+):(generateContent|batchGenerateContent)")
_BATCH = re.compile(r"/v1beta/batches/([A-Za-z0-9_-]+)(:cancel)?")
_FILE = re.compile(r"/v1beta/files/([A-Za-z0-9_-]+)")
_DOWNLOAD = re.compile(r"(?:/download)?/v1beta/files/([A-Za-z0-9_-]+):download")  # the SDK uses the second form
_BAD_KEY = [
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
]


class GoogleAPI:
    """Google's API in front of the gateway's images, faults and statistics."""

    def __init__(self, config: MockConfig, gateway: Gateway) -> None:
        self.config = config
        self.gateway = gateway
        self._rng = random.Random()
        self.batches = BatchService(
            model_ids=dict(config.model_ids), latency_s=config.batch_latency_s, faults=config.batch_faults,
            max_open=config.batch_max_open, max_tokens=config.batch_max_tokens, seed=config.seed,
            state_dir=config.state_dir, pick=gateway.pick_fault,
        )  # fmt: skip
        self.key_in_url = 0  # requests that carried the key in the URL (?key=): runner must never

    def close(self) -> None:
        self.batches.close()

    def stats(self) -> dict[str, Any]:
        return {**self.batches.snapshot(), "key_in_url": self.key_in_url}

    def reset_stats(self) -> None:
        self.batches.reset_stats()
        self.key_in_url = 0

    @staticmethod
    def serves(path: str) -> bool:
        return path.startswith(("/v1beta/", "/upload/v1beta/", "/download/v1beta/"))

    async def handle(self, request: web.Request) -> Reply | web.StreamResponse:
        try:
            if "upload_id" not in request.query:  # an upload session's URL is its own credential (as Google's is)
                self._authorize(request)
            return await self._route(request)
        except GoogleError as e:
            return json_reply(e.code, e.body())

    def _authorize(self, request: web.Request) -> None:
        key = request.headers.get("x-goog-api-key")
        if key is None and "key" in request.query:
            self.key_in_url += 1
            key = request.query["key"]
        if not key:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            )
        if self.config.api_key is not None and key != self.config.api_key:
            raise GoogleError(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", _BAD_KEY)
        self.gateway.saw_auth(f"x-goog-api-key {key}")

    async def _route(self, request: web.Request) -> Reply | web.StreamResponse:
        path, method, svc, base = request.path, request.method, self.batches, self._base(request)
        if (m := _MODEL_CALL.fullmatch(path)) and method == "POST":
            if m.group(2) == "generateContent":
                body, model_id = await request.read(), m.group(1)
                return await self.gateway.counted(lambda entry: self._generate(model_id, body, entry))
            batch, after = svc.create(m.group(1), await _json(request))
            if after == "drop":  # created, then the connection is lost: the client cannot know
                return Reply(0, action="drop")
            if after == "503":
                return json_reply(503, GoogleError(503, "UNAVAILABLE", "The service is currently unavailable.").body())
            return json_reply(200, svc.view(batch, base))
        if path == "/upload/v1beta/files" and method == "POST":
            if "upload_id" in request.query:
                done = svc.upload_chunk(request.query["upload_id"], _lower(request), await request.read())
                if done is None:
                    return Reply(200, b"", headers=(("X-Goog-Upload-Status", "active"),))
                body = json.dumps({"file": done.resource(base)}).encode()
                return Reply(200, body, headers=(("X-Goog-Upload-Status", "final"),))
            upload_id = svc.upload_start(_lower(request), await _json(request, empty_ok=True))
            url = f"{self._root(request)}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
            headers = (("X-Goog-Upload-URL", url), ("X-Goog-Upload-Status", "active"),
                       ("X-Goog-Upload-Chunk-Granularity", "262144"))  # fmt: skip
            return Reply(200, b"", headers=headers)
        if (m := _DOWNLOAD.fullmatch(path)) and method == "GET":
            return await self._download(request, svc.file(f"files/{m.group(1)}"))
        if (m := _FILE.fullmatch(path)) and method in ("GET", "DELETE"):
            name = f"files/{m.group(1)}"
            if method == "DELETE":
                svc.delete_file(name)
                return json_reply(200, {})
            return json_reply(200, svc.file(name).resource(base))
        if path == "/v1beta/files" and method == "GET":
            return json_reply(200, {"files": [f.resource(base) for f in svc.files.values()]})
        if path == "/v1beta/batches" and method == "GET":
            size = int(request.query.get("pageSize", "50")) if request.query.get("pageSize", "").isdigit() else 50
            return json_reply(200, svc.listing(base, size, request.query.get("pageToken")))
        if (m := _BATCH.fullmatch(path)) and method in ("GET", "POST", "DELETE"):
            if m.group(2) and method == "POST":
                svc.cancel(m.group(1))
                return json_reply(200, {})
            if method == "DELETE":
                svc.delete(m.group(1))
                return json_reply(200, {})
            if method == "GET" and not m.group(2):
                return json_reply(200, svc.view(svc.batch(m.group(1)), base))
        raise GoogleError(404, "NOT_FOUND", f"Requested entity was not found: {method} {path}")

    @staticmethod
    def _root(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def _base(self, request: web.Request) -> str:
        return self._root(request) + "/v1beta"

    # -- generateContent ----------------------------------------------------------------------
    async def _generate(self, model_id: str, raw: bytes, entry: dict[str, Any]) -> Reply:
        try:
            model = model_of(model_id, self.config.model_ids)
            entry["model"] = model
            try:
                body = json.loads(raw)
            except ValueError:
                raise invalid("Invalid JSON payload received.") from None
            gen = parse_generate(body, model, entry, self.batches.file_sha)
        except GoogleError as e:
            return json_reply(e.code, e.body())
        wait = self.gateway.admit(gen)
        if wait is not None:
            return json_reply(429, _exhausted(wait, self.config.retry_after != "none").body())
        kind = await self.gateway.fault_for(gen, entry)
        if kind is None or kind in ("slow", "duplicate"):
            return Reply(200, await self.answer(gen, model_id), paid=not gen.text_only)
        return await self._fault(kind, gen, model_id)

    async def answer(
        self, gen: Generation, model_id: str, variant: str = "", text: str = "", finish: str = "STOP"
    ) -> bytes:
        """A GenerateContentResponse with the request's image (a `variant` of it), as bytes."""
        tokens = bodies.image_tokens(gen.model, gen.size, gen.digest)
        if gen.text_only:
            return response_body(
                gen,
                [],
                model_id=model_id,
                text=text or bodies.TEXT_ONLY,
                tokens=len(bodies.TEXT_ONLY) // 4,
                rng=self._rng,
            )
        images = [_b64(await self.gateway.image(gen, variant))]
        if variant == "two_images":
            images = [_b64(await self.gateway.image(gen)), _b64(await self.gateway.image(gen, "1"))]
        thought = _b64(await self.gateway.image(gen, "thought")) if gen.model == "nanobanana_pro" else None
        return response_body(gen, images, model_id=model_id, text=text, finish=finish, tokens=tokens * len(images),
                             rng=self._rng, thought=thought)  # fmt: skip

    async def _fault(self, kind: str, gen: Generation, model_id: str) -> Reply:
        if kind in ("429", "429_noretry"):
            return json_reply(429, _exhausted(self.config.fault_retry_after_s, kind == "429").body())
        if kind in GOOGLE_FAULTS:
            status, state, message = GOOGLE_FAULTS[kind]
            return json_reply(status, GoogleError(status, state, message).body())
        if kind == "prompt_blocked":
            body = response_body(gen, [], model_id=model_id, tokens=0, rng=self._rng, blocked="PROHIBITED_CONTENT")
            return Reply(200, body)
        if kind in ("drop", "missing"):
            return Reply(0, action="drop")
        if kind == "truncate":
            return Reply(200, await self.answer(gen, model_id), action="truncate")
        if kind == "html":
            return Reply(502, bodies.HTML_502, content_type="text/html")
        if kind in ("empty", "badjson"):
            return Reply(200, bodies.NOT_JSON if kind == "badjson" else b"")
        if kind == "gzip":
            plain = await self.answer(gen, model_id)
            packed = await asyncio.get_running_loop().run_in_executor(None, gzip.compress, plain, 1)
            return Reply(200, packed, headers=(("Content-Encoding", "gzip"),), paid=True)
        return Reply(200, await self.line_body(gen, model_id, LINE_OF_FAULT.get(kind, "ok")), paid=kind in _PAID_FAULTS)

    async def line_body(self, gen: Generation, model_id: str, outcome: str) -> bytes:
        """The response of one request as a results line holds it, for an outcome of batches.LINE_OUTCOMES."""
        if outcome == "blocked":
            text = bodies.REFUSAL if gen.digest[1] % 2 else ""
            return response_body(gen, [], model_id=model_id, text=text, finish="IMAGE_SAFETY", tokens=0, rng=self._rng)
        if outcome == "blocked_prompt":
            return response_body(gen, [], model_id=model_id, tokens=0, rng=self._rng, blocked="PROHIBITED_CONTENT")
        if outcome == "text":
            return response_body(gen, [], model_id=model_id, text=bodies.TEXT_ONLY, tokens=30, rng=self._rng)
        if outcome == "not_image":
            fake = _b64(data_uri(self.config.mime, not_an_image(gen.digest)))
            return response_body(gen, [fake], model_id=model_id, tokens=100, rng=self._rng)
        if outcome == "unicode":
            return await self.answer(gen, model_id, text=bodies.UNICODE_TEXT)
        variant = outcome if outcome in ("two_images", "same_image", "wrong_shape", "uniform") else ""
        return await self.answer(gen, model_id, variant)

    # -- results files ------------------------------------------------------------------------
    async def _download(self, request: web.Request, file: Any) -> web.StreamResponse:
        svc = self.batches
        stream = web.StreamResponse(status=200, headers={"Content-Type": file.mime or "application/octet-stream"})
        await stream.prepare(request)
        if file.batch is None:  # an uploaded file: its bytes as they came
            with svc._content(file.name).open("rb") as f:
                while chunk := f.read(1 << 20):
                    await stream.write(chunk)
        else:
            batch = svc.batch(file.batch)
            for position, (gen, key, outcome) in enumerate(svc.results(file)):
                if isinstance(gen, dict):  # the request itself was refused: an error line
                    await stream.write(results_line(key, position, error=gen) + b"\n")
                    continue
                if outcome.startswith("error:"):
                    status = outcome.split(":", 1)[1]
                    code = {"RESOURCE_EXHAUSTED": 8, "INTERNAL": 13, "UNAVAILABLE": 14, "DEADLINE_EXCEEDED": 4,
                            "INVALID_ARGUMENT": 3, "UNAUTHENTICATED": 16, "PERMISSION_DENIED": 7}.get(status, 13)  # fmt: skip
                    line = results_line(
                        key, position, error=line_error(code, status, GOOGLE_FAULTS_BY_STATUS.get(status, status))
                    )
                else:
                    line = results_line(key, position, response=await self.line_body(gen, batch.model_id, outcome))
                if outcome == "truncate":
                    line = line[: max(16, len(line) // 2)]  # cut off: the line ends, its JSON does not
                await stream.write(line + b"\n")
                if outcome == "duplicate":
                    await stream.write(line + b"\n")
        await stream.write_eof()
        return stream


LINE_OF_FAULT = {"content_filter": "blocked", "text_only": "text", "not_image": "not_image", "two_images": "two_images",
                 "same_image": "same_image", "wrong_shape": "wrong_shape", "uniform": "uniform", "unicode": "unicode",
                 "batch_failed": "ok", "batch_expired": "ok"}  # fmt: skip
_PAID_FAULTS = ("two_images", "same_image", "wrong_shape", "uniform", "unicode", "batch_failed", "batch_expired")
GOOGLE_FAULTS_BY_STATUS = {state: message for _, state, message in GOOGLE_FAULTS.values()}


def _exhausted(wait: float, say: bool) -> GoogleError:
    details = retry_info(wait) if say else []
    message = (
        f"Resource has been exhausted (e.g. check quota). Please retry in {wait:.1f}s."
        if say
        else "Resource has been exhausted (e.g. check quota)."
    )
    return GoogleError(429, "RESOURCE_EXHAUSTED", message, details)


def _b64(uri: bytes) -> tuple[str, bytes]:
    """(mime, base64) of a `data:` URI."""
    head, _, data = uri.partition(b",")
    return head[5:].split(b";", 1)[0].decode(), data


def _lower(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


async def _json(request: web.Request, empty_ok: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip() and empty_ok:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise invalid("Invalid JSON payload received.") from None
