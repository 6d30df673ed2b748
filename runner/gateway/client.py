"""One request to the gateway: build the body, send it within bounds, and turn the answer into images or a Failure."""

from __future__ import annotations

import json
from typing import Any

import anyio.to_thread

from ..policy import Failure, classify_status
from ..safety import clean_message
from ..spec.inputs import InputError, Inputs
from ..spec.items import Item
from .answer import Outcome, parse_completion
from .deadline import Deadlines
from .http import Fault, Http

# Big answers (a 2K image is a few MB of base64) are parsed off the event loop, and so are
# request bodies that carry big reference images.
THREAD_PARSE_BYTES = 512 * 1024


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


class Client:
    """Sends items to `POST {base_url}/chat/completions` and classifies every answer.

    Every fault of one request becomes a Failure of that item: timeouts, dropped connections,
    malformed HTTP, bodies over `max_response_bytes` (counted after decompression, so a gzip
    bomb stops at the cap). What is not a network fault (a bug) is raised, for the pool to
    record as `internal`."""

    def __init__(
        self,
        http: Http,
        api_key: str | None,
        timeout_s: float,
        *,
        deadlines: Deadlines | None = None,
        max_response_bytes: int = 64 << 20,
        api_format: str = "nanobanana",
        inputs: Inputs | None = None,
    ) -> None:
        self.http = http
        self.timeout_s = timeout_s
        self.deadlines = deadlines or Deadlines()
        self.max_response_bytes = max_response_bytes
        self.api_format = api_format
        self.inputs = inputs
        self._key = api_key

    async def generate(self, item: Item) -> Outcome | None:
        """The item's outcome, or None when the request was given up (Deadlines.cancel_all)."""
        try:
            content = await self._body(item)
        except InputError as e:
            return Failure("bad_request", None, self._msg(str(e)), final=True)
        try:
            with self.deadlines.limit(self.timeout_s) as scope:
                status, headers, body = await self.http.post(content, self.max_response_bytes)
        except Fault as f:
            return Failure(f.kind, f.status, self._msg(f.message), final=f.final)
        if scope.cancelled_caught:
            if self.deadlines.cancelled:
                return None
            return Failure("timeout", None, f"no complete answer within {self.timeout_s:g}s")
        if status != 200:
            return classify_status(status, body[:20_000], headers, self._key)
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

    def _msg(self, text: str) -> str:
        return clean_message(text, self._key)
