"""One request: build the item's body in its format, send it within bounds, and turn the answer into images or a Failure."""

from __future__ import annotations

import anyio.to_thread

from ..policy import Failure
from ..safety import clean_message
from ..spec.inputs import InputError, Inputs
from ..spec.items import Item
from .answer import Outcome
from .deadline import Deadlines
from .formats import RequestFormat, encode
from .http import Fault, Http

# Big answers (a 2K image is a few MB of base64) are parsed off the event loop, and so are
# request bodies that carry big reference images.
THREAD_PARSE_BYTES = 512 * 1024


class Client:
    """Sends items in one RequestFormat and classifies every answer.

    Every fault of one request becomes a Failure of that item: timeouts, dropped connections,
    malformed HTTP, bodies over `max_response_bytes` (counted after decompression, so a gzip
    bomb stops at the cap). What is not a network fault (a bug) is raised, for the pool to
    record as `internal`."""

    def __init__(
        self,
        http: Http,
        api_key: str | None,
        timeout_s: float,
        request_format: RequestFormat,
        *,
        base_url: str,
        deadlines: Deadlines | None = None,
        max_response_bytes: int = 64 << 20,
        inputs: Inputs | None = None,
    ) -> None:
        self.http = http
        self.timeout_s = timeout_s
        self.format = request_format
        self.base_url = base_url
        self.deadlines = deadlines or Deadlines()
        self.max_response_bytes = max_response_bytes
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
                status, headers, body = await self.http.post(
                    self.format.url(self.base_url, item), content, self.max_response_bytes
                )
        except Fault as f:
            return Failure(f.kind, f.status, self._msg(f.message), final=f.final)
        if scope.cancelled_caught:
            if self.deadlines.cancelled:
                return None
            return Failure("timeout", None, f"no complete answer within {self.timeout_s:g}s")
        if status != 200:
            return self.format.classify(status, body[:20_000], headers, self._key)
        if len(body) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(self.format.parse, body, self._key)
        return self.format.parse(body, self._key)

    async def _body(self, item: Item) -> bytes:
        if sum(i.size for i in item.inputs) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(lambda: encode(self.format.request(item, self.inputs)))
        return encode(self.format.request(item, self.inputs))

    def _msg(self, text: str) -> str:
        return clean_message(text, self._key)
