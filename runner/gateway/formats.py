"""Request formats: what an item's request looks like on the wire and how its answer is read, one class per API shape.

A `RequestFormat` is chosen once per run by `make_format` (the spec's `api_format`); the client,
the batch backend and the mock's checks all go through it, so no code switches on the name:

- `nanobanana`: the gateway's documented chat shape (`extra_body.google.image_config`);
- `openai-compatible`: LiteLLM, OpenRouter (top-level `image_config` and `modalities`);
- `gemini`: Google's own `models/{id}:generateContent` (see gateway/gemini.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from ..models import MODELS
from ..policy import Failure, classify_status
from ..spec.inputs import InputImage, Inputs
from ..spec.items import Item
from .answer import Outcome, parse_completion

CHAT_FORMATS = ("nanobanana", "openai-compatible")


class RequestFormat(Protocol):
    """How one item is asked for and its answer read."""

    name: str

    def url(self, base_url: str, item: Item) -> str:
        """Where the item's request is POSTed."""
        ...

    def auth_headers(self, api_key: str) -> dict[str, str]: ...

    def request(self, item: Item, inputs: Inputs | None) -> dict[str, Any]:
        """The JSON body of the item's request; InputError when a reference image changed."""
        ...

    def parse(self, body: bytes | bytearray, api_key: str | None) -> Outcome:
        """A 200 answer -> images, or the Failure it really is."""
        ...

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None, api_key: str | None) -> Failure:
        """A non-200 answer -> its Failure."""
        ...


class ChatFormat:
    """OpenAI chat completions: `POST {base_url}/chat/completions`, the key as a Bearer token.

    `nanobanana` sends the image config as the gateway documents it, a literal
    `extra_body.google.image_config`; `openai-compatible` (LiteLLM, OpenRouter) sends it as a
    top-level `image_config` with `modalities`, since those forward a literal extra_body to Google
    as an unknown field. Reference images make the user message's `content` a list of parts, text
    first, then one `image_url` part per image (a data: URI, or the URL as it is)."""

    def __init__(self, name: str = "nanobanana") -> None:
        assert name in CHAT_FORMATS
        self.name = name

    def url(self, base_url: str, item: Item) -> str:
        return base_url + "/chat/completions"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def request(self, item: Item, inputs: Inputs | None) -> dict[str, Any]:
        urls = None
        if item.inputs:
            assert inputs is not None, "items with reference images need the spec's Inputs"
            urls = [inputs.data_uri(i) for i in item.inputs]
        return chat_body(item, self.name, urls)

    def parse(self, body: bytes | bytearray, api_key: str | None) -> Outcome:
        return parse_completion(body, api_key)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None, api_key: str | None) -> Failure:
        return classify_status(status, body, headers, api_key)


def chat_body(item: Item, api_format: str = "nanobanana", image_urls: list[str] | None = None) -> dict[str, Any]:
    """The chat-completions body of an item's request (`image_urls`: its reference images as sent)."""
    content: str | list[dict[str, Any]] = item.prompt
    if image_urls:
        content = [{"type": "text", "text": item.prompt}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    body: dict[str, Any] = {"model": item.model, "stream": False, "messages": [{"role": "user", "content": content}]}
    config = item.config.as_sent()  # empty when neither is given: nothing is sent, the model decides
    if api_format == "openai-compatible":
        if config:
            body["image_config"] = config
        body["modalities"] = ["image", "text"]
    elif config:
        body["extra_body"] = {"google": {"image_config": config}}
    body.update(item.sent_params())
    return body


def request_body(item: Item, api_format: str = "nanobanana", image_urls: list[str] | None = None) -> dict[str, Any]:
    """The JSON body runner sends for an item without needing an Inputs (tests, benchmarks): its
    reference images given as `image_urls` (chat) or left out."""
    if api_format in CHAT_FORMATS:
        return chat_body(item, api_format, image_urls)
    from .gemini import GeminiFormat

    return GeminiFormat().request(item, None)


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


def make_format(api_format: str, model_ids: Mapping[str, str] | None = None) -> RequestFormat:
    """The request format of a spec's `api_format`, chosen once per run."""
    if api_format in CHAT_FORMATS:
        return ChatFormat(api_format)
    from .gemini import GeminiFormat

    return GeminiFormat(model_ids)


def default_model_ids() -> dict[str, str]:
    """Google's name for each of runner's models (overridden by the spec's `model_ids`)."""
    return {name: info.google_model for name, info in MODELS.items()}


__all__ = ["CHAT_FORMATS", "ChatFormat", "InputImage", "RequestFormat", "make_format", "request_body"]
