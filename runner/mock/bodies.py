"""What the mock gateway says: error bodies, 429s in each flavour, and chat.completion answers with spliced images."""

from __future__ import annotations

import functools
import json
import math
import random
import string
import time
from collections.abc import Sequence
from typing import Any

from ..models import MODELS


def error_body(message: str, type_: str | None, code: Any, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param, **extra}}


AUTH_ERROR = error_body("Invalid token", "authentication_error", "invalid_api_key")
TOO_LARGE = error_body("Request body too large", "request_too_large", "request_too_large")
# Fault kind -> (status, body) for the faults that are a plain JSON error.
FAULT_ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "500": (500, error_body("Internal server error", "server_error", 500)),
    "500_empty": (500, error_body("empty response from upstream", "server_error", "empty_response")),
    "502": (502, error_body("Bad gateway: upstream connection failed", "server_error", 502)),
    "503": (503, error_body("The model is overloaded. Please try again later.", "server_error", 503)),
    "504": (504, error_body("Gateway timeout: upstream did not answer in time", "server_error", 504)),
    "400": (400, error_body("Request contains an invalid argument.", "invalid_request_error", "invalid_request")),
    "prompt_blocked": (
        400,
        error_body("request blocked by Gemini API: PROHIBITED_CONTENT", "prompt_blocked", "prompt_blocked"),
    ),
    "401": (401, AUTH_ERROR),
    "402": (402, error_body("insufficient balance, please top up", "permission_error", "insufficient_balance")),
    "403": (403, error_body("this key may not use this model", "permission_error", "access_denied")),
    "413": (413, TOO_LARGE),
}
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
NOT_JSON = b'{"id": "chatcmpl-'
REFUSAL = "I can't create that image because it may go against the safety policy."
TEXT_ONLY = "Here is a description of the scene instead of an image: a quiet composition in soft light."
TWO_IMAGES = "Here are two versions."
# Non-ASCII, an emoji outside the BMP, a right-to-left mark and Arabic text: what a careless decoder trips on.
UNICODE_TEXT = "Voilà — voici l'image ✨🎨🖼️ \u200fهذه صورتك\u200f «fertig»"
_SLOT = "\x00slot{}\x00"
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps builds a new one per call for non-defaults


def relayed_error(rng: random.Random) -> dict[str, Any]:
    """An upstream error passed through: numeric code, empty type, a request id in the message."""
    request_id = f"{time.strftime('%Y%m%d%H%M%S')}{rng.randrange(10**12):012d}"
    message = f"Request contains an invalid argument. (request id: {request_id})"
    return {"error": {"message": message, "type": "", "code": 400}}


def rate_limited(wait: float | None, mode: str) -> tuple[tuple[tuple[str, str], ...], dict[str, Any]]:
    """Headers and body of a 429 announcing `wait` seconds per `mode` (header|body|both|none)."""
    seconds = max(1, math.ceil(wait or 0))
    headers = (("Retry-After", str(seconds)),) if mode in ("header", "both") and wait is not None else ()
    if mode in ("body", "both") and wait is not None:
        message = f"You exceeded your current quota, please check your plan. Please retry in {wait:.1f}s."
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds}s"}]
        return headers, error_body(message, "rate_limit_error", "rate_limit_exceeded", details=details)
    return headers, error_body("Rate limit reached for requests", "rate_limit_error", "rate_limit_exceeded")


def rate_limited_relayed(wait: float | None) -> dict[str, Any]:
    """A 429 as LiteLLM relays Google's: no header, Google's whole JSON error as text inside `message`."""
    google: dict[str, Any] = {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
    }
    if wait is not None:
        google["message"] = f"You exceeded your current quota, please check your plan. Please retry in {wait:.1f}s."
        retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{max(1, math.ceil(wait))}s"}
        google["details"] = [retry]
    relayed = json.dumps({"error": google}, indent=2)
    return error_body(f"litellm.RateLimitError: VertexAIException - {relayed}", "throttling_error", "429")


def image_tokens(model: str, size: str, digest: bytes) -> int:
    """Billed output tokens of one image; Pro adds 100-300 thinking tokens, fixed per request."""
    return MODELS[model].tokens[size] + (100 + digest[0] % 201 if model == "nanobanana_pro" else 0)


@functools.cache
def _needle(i: int) -> bytes:
    """Slot i as it appears once serialized."""
    return json.dumps(_SLOT.format(i)).encode()


def _string(text: str) -> bytes:
    return _ENCODER.encode(text).encode()


def completion(
    model: str,
    prompt: str,
    uris: Sequence[bytes],
    text: str,
    finish: str,
    tokens: int,
    rng: random.Random,
    answer_format: str,
) -> bytes:
    """A chat.completion body. `markdown`: text and `![image](uri)` joined by newlines in `content`;
    `images`: the text (or null) in `content`, the URIs in `images`. Each URI (ASCII, safe in a JSON
    string as is) is spliced into the serialized JSON, so a big image is never escaped or parsed."""
    now = time.time()
    letters = "".join(rng.choices(string.ascii_letters + string.digits, k=8))
    prompt_tokens = len(prompt.split()) + 5
    slots: list[bytes] = []
    message: dict[str, Any] = {"role": "assistant"}
    if answer_format == "markdown":
        parts = [_string(text)[1:-1]] if text else []
        slots.append(b'"' + b"\\n".join(parts + [b"![image](" + uri + b")" for uri in uris]) + b'"')
        message["content"] = _SLOT.format(0)
    else:
        message["content"] = text or None
        if uris:
            message["images"] = [
                {"type": "image_url", "image_url": {"url": _SLOT.format(i)}, "index": i} for i in range(len(uris))
            ]
            slots += [b'"' + uri + b'"' for uri in uris]
    if model == "nanobanana_pro" and finish == "stop":
        message["reasoning_content"] = "**Planning the image** Composing the scene from the prompt."
    payload = {
        "id": f"chatcmpl-{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}{int(now % 1 * 1e6):06d}000{letters}",
        "object": "chat.completion",
        "created": int(now),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
    }
    pieces: list[bytes] = []
    rest = _ENCODER.encode(payload).encode()
    for i, slot in enumerate(slots):
        before, rest = rest.split(_needle(i), 1)
        pieces += (before, slot)
    pieces.append(rest)
    return b"".join(pieces)
