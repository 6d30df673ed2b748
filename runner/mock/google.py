"""Google's Gemini API as the mock serves it: `generateContent`, checked like the real one, with the gateway's faults.

The Files and Batch APIs are in mock/batches.py; both share the gateway's images, fault
markers and statistics, so the same request gets the same image whichever API asked for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
import string
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..imageinfo import dimensions
from ..models import MODELS, effective_size
from .validate import DIGEST_PARAMS, MAX_INPUT_IMAGES, Generation, _magic_ok, input_ratio

# GenerateContentRequest's fields; proto JSON takes the lowerCamel and the snake_case spelling.
_FIELDS = frozenset(
    {"model", "contents", "tools", "toolConfig", "tool_config", "safetySettings", "safety_settings",
     "systemInstruction", "system_instruction", "generationConfig", "generation_config",
     "cachedContent", "cached_content"}
)  # fmt: skip
_CONFIG = frozenset(
    {"responseModalities", "response_modalities", "imageConfig", "image_config", "seed", "temperature", "topP",
     "top_p", "topK", "top_k", "candidateCount", "candidate_count", "maxOutputTokens", "max_output_tokens",
     "thinkingConfig", "thinking_config"}
)  # fmt: skip
_INPUT_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
_SLOT = "\x00slot{}\x00"
_ENCODER = json.JSONEncoder(ensure_ascii=False)
THOUGHT = "**Planning the image** Composing the scene from the prompt."


class GoogleError(Exception):
    """A request refused the way Google refuses it: `{"error": {"code", "message", "status"}}`."""

    def __init__(self, code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid(message: str) -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", message)


def field(obj: Mapping[str, Any], camel: str) -> Any:
    """`obj[camel]` or its snake_case spelling (proto JSON accepts both)."""
    if camel in obj:
        return obj[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return obj.get(snake)


def model_of(model_id: str, model_ids: Mapping[str, str]) -> str:
    """runner's model for a Gemini model id (`models/` prefix allowed), or Google's 404."""
    model_id = model_id.removeprefix("models/")
    for model, known in model_ids.items():
        if known == model_id:
            return model
    raise GoogleError(
        404,
        "NOT_FOUND",
        f"models/{model_id} is not found for API version v1beta, or is not supported for generateContent.",
    )


def parse_generate(body: Any, model: str, entry: dict[str, Any], file_sha: Callable[[str], str | None]) -> Generation:
    """A GenerateContentRequest (parsed JSON) as a Generation, or GoogleError; fills the log `entry`.

    `file_sha` gives the sha256 of an uploaded file by its name or URI (None: no such file), so an
    image sent as `fileData` is the same input as the same bytes sent inline."""
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an object.")
    for key in body:
        if key not in _FIELDS:
            raise invalid(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents or not isinstance(contents[-1], dict):
        raise invalid("contents is not specified")
    parts = contents[-1].get("parts")
    if not isinstance(parts, list) or not parts:
        raise invalid("contents.parts must not be empty")
    texts: list[str] = []
    inputs: list[str] = entry["inputs"]
    shapes: list[tuple[int, int] | None] = []  # each input's (width, height), for a request without aspectRatio
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise invalid(f"contents[0].parts[{i}]: expected an object")
        inline, data_ref = field(part, "inlineData"), field(part, "fileData")
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(inline, dict):
            inputs.append(_inline(inline, i, shapes))
        elif isinstance(data_ref, dict):
            uri = str(field(data_ref, "fileUri") or "")
            sha = file_sha(uri)
            if sha is None:
                raise GoogleError(
                    403,
                    "PERMISSION_DENIED",
                    f"You do not have permission to access the File {uri} or it may not exist.",
                )
            inputs.append(sha)
            shapes.append(None)  # an uploaded file: its shape is not looked up (a square, as without one)
        else:
            raise invalid(f"contents[0].parts[{i}]: a part needs text, inlineData or fileData")
    prompt = "\n".join(texts)
    entry["prompt"] = prompt
    if not prompt.strip():
        raise invalid("the request needs a text part")
    if len(inputs) > MAX_INPUT_IMAGES[model]:
        raise invalid(f"too many input images ({len(inputs)}): at most {MAX_INPUT_IMAGES[model]}")
    config = field(body, "generationConfig") or {}
    if not isinstance(config, dict):
        raise invalid("generationConfig must be an object")
    for key in config:
        if key not in _CONFIG:
            raise invalid(
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config': Cannot find field."
            )
    modalities = field(config, "responseModalities") or ["TEXT", "IMAGE"]
    if not isinstance(modalities, list) or not set(modalities) <= {"TEXT", "IMAGE"}:
        raise invalid(f"responseModalities must hold TEXT and/or IMAGE, not {modalities!r}")
    image_config = field(config, "imageConfig") or {}
    if not isinstance(image_config, dict):
        raise invalid("imageConfig must be an object")
    entry["image_config"], entry["config_from"] = image_config, "generationConfig"
    for key in image_config:
        if key not in ("aspectRatio", "aspect_ratio", "imageSize", "image_size"):
            raise invalid(f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config.image_config'")
    info = MODELS[model]
    ratio = field(image_config, "aspectRatio") or input_ratio(model, shapes)  # none sent: the input's shape
    if ratio not in info.aspect_ratios:
        raise invalid(f"aspect ratio {ratio!r} is not supported")
    size = field(image_config, "imageSize")
    if size is not None and (not info.sizes or size not in info.sizes):
        raise invalid(f"image size {size!r} is not supported by this model")
    params: dict[str, Any] = {}
    for name, key in (("seed", "seed"), ("temperature", "temperature"), ("top_p", "topP")):
        value = field(config, key)
        if value is not None and name in DIGEST_PARAMS:
            params[name] = value
    entry["params"] = params
    return Generation(
        model, prompt, ratio, effective_size(model, size if info.sizes else None), inputs, params,
        text_only="IMAGE" not in modalities,
    )  # fmt: skip


def _inline(inline: dict[str, Any], i: int, shapes: list[tuple[int, int] | None]) -> str:
    mime = str(field(inline, "mimeType") or "").lower()
    if mime not in _INPUT_MIMES:
        raise invalid(f"contents[0].parts[{i}].inlineData: unsupported MIME type {mime!r}")
    raw = str(inline.get("data", ""))
    try:  # proto3 JSON takes bytes in the standard or the URL-safe alphabet (google-genai sends the second)
        data = (
            base64.b64decode(raw, validate=True) if "-" not in raw and "_" not in raw else base64.urlsafe_b64decode(raw)
        )
    except (binascii.Error, ValueError):
        raise invalid(f"contents[0].parts[{i}].inlineData.data: invalid base64") from None
    if not _magic_ok(mime, data):
        raise invalid(f"contents[0].parts[{i}]: the image data is not a valid {mime} file")
    shapes.append(dimensions(data))
    return hashlib.sha256(data).hexdigest()


def response_body(
    gen: Generation,
    images: list[tuple[str, bytes]],
    *,
    model_id: str,
    text: str = "",
    finish: str = "STOP",
    tokens: int,
    rng: random.Random,
    thought: tuple[str, bytes] | None = None,
    blocked: str | None = None,
) -> bytes:
    """A GenerateContentResponse. `images`: (mime, base64) spliced into the serialized JSON as is;
    `thought`: a draft image the model thought with (Pro does), marked `thought: true`;
    `blocked`: a promptFeedback.blockReason, with no candidates."""
    prompt_tokens = len(gen.prompt.split()) + 5 + 258 * len(gen.inputs)
    usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": tokens, "totalTokenCount": prompt_tokens + tokens,
             "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]}  # fmt: skip
    rid = "".join(rng.choices(string.ascii_letters + string.digits, k=22))
    payload: dict[str, Any] = {"usageMetadata": usage, "modelVersion": model_id, "responseId": rid}
    slots: list[bytes] = []
    if blocked is not None:
        payload["promptFeedback"] = {"blockReason": blocked}
        return _ENCODER.encode(payload).encode()
    parts: list[dict[str, Any]] = []
    if thought is not None:
        parts.append({"text": THOUGHT, "thought": True})
        parts.append({"inlineData": {"mimeType": thought[0], "data": _SLOT.format(len(slots))}, "thought": True})
        slots.append(thought[1])
    if text:
        parts.append({"text": text})
    for mime, data in images:
        parts.append({"inlineData": {"mimeType": mime, "data": _SLOT.format(len(slots))}})
        slots.append(data)
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}
    payload = {"candidates": [candidate], **payload}
    rest = _ENCODER.encode(payload).encode()
    pieces: list[bytes] = []
    for i, data in enumerate(slots):
        before, rest = rest.split(json.dumps(_SLOT.format(i)).encode(), 1)
        pieces += (before, b'"' + data + b'"')
    pieces.append(rest)
    return b"".join(pieces)


def line_error(code: int, status: str, message: str) -> dict[str, Any]:
    """A batch results line's `error` (google.rpc.Status: a numeric rpc code, not an HTTP status)."""
    return {"code": code, "message": message, "status": status}


# Fault kinds of the gateway, as Google itself answers them: (HTTP status, status text, message).
GOOGLE_FAULTS: dict[str, tuple[int, str, str]] = {
    "500": (500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"),
    "500_empty": (500, "INTERNAL", "Internal error encountered."),
    "502": (502, "UNAVAILABLE", "Bad gateway."),
    "503": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
    "504": (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    "400": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "400_relayed": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "401": (401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
    "402": (429, "RESOURCE_EXHAUSTED", "Your project has run out of prepayment credits."),
    "403": (403, "PERMISSION_DENIED", "Your API key was reported as leaked. Please use another API key."),
    "413": (400, "INVALID_ARGUMENT", "Request payload size exceeds the limit: 20971520 bytes."),
}  # fmt: skip
# The same, as a batch results line says it: google.rpc codes.
RPC_CODES = {"INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "PERMISSION_DENIED": 7,
             "RESOURCE_EXHAUSTED": 8, "INTERNAL": 13, "UNAVAILABLE": 14, "UNAUTHENTICATED": 16}  # fmt: skip


def retry_info(seconds: float) -> list[dict[str, Any]]:
    return [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{max(1, round(seconds))}s"}]


def now_iso(at: float | None = None) -> str:
    stamp = time.gmtime(time.time() if at is None else at)
    return time.strftime("%Y-%m-%dT%H:%M:%S", stamp) + f".{int(((at or time.time()) % 1) * 1e6):06d}Z"
