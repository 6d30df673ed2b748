"""Google's own API shape: `models/{id}:generateContent` requests, and its answers read into images or failures.

The same reader serves an interactive answer and a line of a batch's results file (its `response`),
so both paths record an item alike (shared/gemini-batch-api.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from ..imageinfo import is_whole_image
from ..policy import Failure, classify_status, error_status
from ..safety import clean_message, safe_json, safe_text
from ..spec.inputs import Inputs
from ..spec.items import Item
from .answer import MAX_DOCUMENT, MAX_IMAGES, Image, Outcome, Success, loads, served_model

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
_STEP = 1 << 20  # base64 characters decoded per step (a multiple of 4)
_DATA_KEY = re.compile(rb'"data"\s*:\s*"')
# candidates[0].finishReason values that mean the image (or the prompt) was refused.
BLOCKED = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER",
})  # fmt: skip
_PARAMS = {"seed": "seed", "temperature": "temperature", "top_p": "topP"}
# google.rpc codes of a batch results line's `error`, as the HTTP status the same error has.
RPC_STATUS = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
              12: 501, 13: 500, 14: 503, 15: 500, 16: 401}  # fmt: skip


class GeminiFormat:
    """`POST {base_url}/models/{model_id}:generateContent`, the key in `x-goog-api-key` (never in a URL)."""

    name = "gemini"

    def __init__(self, model_ids: Mapping[str, str] | None = None) -> None:
        from .formats import default_model_ids

        self.model_ids = {**default_model_ids(), **(model_ids or {})}

    def model_id(self, model: str) -> str:
        return self.model_ids[model]

    def url(self, base_url: str, item: Item) -> str:
        return f"{base_url}/models/{self.model_id(item.model)}:generateContent"

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def request(self, item: Item, inputs: Inputs | None, file_uris: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A GenerateContentRequest: the text part, then one part per reference image (inline, or
        a Files API `fileData` where `file_uris` has the image's sha256)."""
        parts: list[dict[str, Any]] = [{"text": item.prompt}]
        for image in item.inputs:
            uri = file_uris.get(image.sha256 or "") if file_uris else None
            if uri is not None:
                parts.append({"fileData": {"mimeType": image.mime, "fileUri": uri}})
                continue
            assert inputs is not None, "items with reference images need the spec's Inputs"
            data = inputs.data_uri(image)
            parts.append({"inlineData": {"mimeType": image.mime, "data": data[data.index(",") + 1 :]}})
        image_config: dict[str, str] = {}
        if item.config.aspect_ratio is not None:  # none sent: Google keeps the input image's shape
            image_config["aspectRatio"] = item.config.aspect_ratio
        if item.config.image_size is not None:
            image_config["imageSize"] = item.config.image_size
        config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": image_config}
        for name, value in item.sent_params().items():
            config[_PARAMS.get(name, name)] = value
        return {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}

    def parse(self, body: bytes | bytearray, api_key: str | None) -> Outcome:
        return parse_response(body, api_key)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None, api_key: str | None) -> Failure:
        return classify(status, body, headers, api_key)


def classify(status: int, body: bytes, headers: Mapping[str, str] | None, api_key: str | None) -> Failure:
    """A non-200 answer of Google's API as a Failure (a wrong key is a 400 there, not a 401)."""
    failure = classify_status(status, body, headers, api_key)
    if status == 400 and b"API_KEY_INVALID" in body[:20_000]:
        return Failure("auth", status, failure.message)
    return failure


def parse_response(body: bytes | bytearray, api_key: str | None) -> Outcome:
    """A GenerateContentResponse (bytes) -> Success with checked images, or its Failure."""
    cut = _cut_data(body) if len(body) > MAX_DOCUMENT // 4 else None
    doc, images = cut if cut is not None else (body, None)
    if len(doc) > MAX_DOCUMENT:
        return Failure(
            "invalid_response", 200, f"answer has {len(doc) / 2**20:.1f} MB of JSON besides its images", final=True
        )
    try:
        obj = loads(doc)
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{bytes(doc[:120])!r}"
        return Failure("invalid_response", 200, clean_message(f"body is not JSON: {why}", api_key))
    return read_response(obj, api_key, images)


def read_results_line(line: bytes, api_key: str | None) -> tuple[str, Outcome] | None:
    """A line of a batch's results file (`{"key", "response"}` or `{"key", "error"}`, in either
    order) -> (key, Outcome), or None when it is not such a line (cut off, not JSON)."""
    cut = _cut_data(line) if len(line) > MAX_DOCUMENT // 4 else None
    doc, images = cut if cut is not None else (line, None)
    if len(doc) > MAX_DOCUMENT:
        return None
    try:
        obj = json.loads(doc)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        return None
    if isinstance(obj.get("error"), dict):
        return obj["key"], error_failure(obj["error"], api_key)
    if "response" not in obj:
        return None
    return obj["key"], read_response(obj["response"], api_key, images)


def _cut_data(body: bytes | bytearray) -> tuple[bytes, list[bytes]] | None:
    """Take every `"data": "<base64>"` out of the raw body and decode it in steps, before the JSON
    is parsed (a 4K answer is ~20 MB of base64: parsed as JSON it holds the GIL far longer and keeps
    several copies). None when anything is unusual (an escape in the string): parse plainly then."""
    view = memoryview(body)
    parts: list[bytes] = []
    images: list[bytes] = []
    pos = 0
    for m in _DATA_KEY.finditer(body):
        if m.start() < pos:
            continue
        start = m.end()
        end = body.find(b'"', start)
        if end < 0 or body.find(b"\\", start, end) >= 0 or len(images) >= MAX_IMAGES:
            return None
        try:
            images.append(b"".join(binascii.a2b_base64(view[k : min(k + _STEP, end)], strict_mode=True)
                                   for k in range(start, end, _STEP)))  # fmt: skip
        except binascii.Error:
            return None
        parts.append(bytes(view[pos:start]))
        pos = end
    if not images:
        return None
    parts.append(bytes(view[pos:]))
    return b"".join(parts), images


def read_response(obj: Any, api_key: str | None, cut: list[bytes] | None = None) -> Outcome:
    """A parsed GenerateContentResponse -> Success or Failure (`cut`: inline data already taken out)."""
    if not isinstance(obj, dict):
        return Failure("invalid_response", 200, "answer is not a JSON object")
    if isinstance(obj.get("error"), dict):  # an error inside a 200: read as the error it is
        return error_failure(obj["error"], api_key)
    raw_id = obj.get("responseId")
    request_id = safe_text(raw_id, api_key, keep_newlines=False, limit=200) if isinstance(raw_id, str) else None
    usage = safe_json(obj["usageMetadata"], api_key) if isinstance(obj.get("usageMetadata"), dict) else None
    feedback = obj.get("promptFeedback")
    candidates = obj.get("candidates")
    if not candidates and isinstance(feedback, dict) and feedback.get("blockReason"):
        why = clean_message(f"prompt blocked: {feedback.get('blockReason')}", api_key)
        return Failure("prompt_blocked", 200, why, request_id=request_id)
    candidate = candidates[0] if isinstance(candidates, list) and candidates else None
    if not isinstance(candidate, dict):
        return Failure("invalid_response", 200, "answer has no candidates[0]", request_id=request_id)
    finish = candidate.get("finishReason")
    finish = finish if isinstance(finish, str) else None  # an enum name; anything else says nothing
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    if parts is None:
        parts = []
    if not isinstance(parts, list):
        return Failure("invalid_response", 200, "candidates[0].content.parts is not a list", request_id=request_id)
    images: list[Image] = []
    texts: list[str] = []
    pending = iter(cut) if cut is not None else None
    for part in parts:
        if not isinstance(part, dict):
            return Failure("invalid_response", 200, "a part is not an object", request_id=request_id)
        inline = part.get("inlineData", part.get("inline_data"))
        if isinstance(inline, dict):
            data = next(pending, None) if pending is not None else None
            if part.get("thought"):
                continue  # a draft the model thought with, not its answer
            decoded = _image(inline, data, api_key, request_id)
            if isinstance(decoded, Failure):
                return decoded
            if decoded.data not in (i.data for i in images):
                images.append(decoded)
        elif isinstance(part.get("text"), str) and not part.get("thought"):
            texts.append(part["text"])
    if len(images) > MAX_IMAGES:
        return Failure("invalid_response", 200, f"answer holds {len(images)} images", request_id=request_id)
    text = safe_text("\n".join(texts), api_key).strip()
    said = f": {text[:200]}" if text else ""
    if finish in BLOCKED:
        why = clean_message(f"image blocked ({finish}){said}", api_key)
        return Failure("content_filter", 200, why, request_id=request_id)
    if not images:
        why = f" ({finish})" if finish not in (None, "STOP", "") else ""
        message = clean_message(f"answer has no image{why}{said or ' (empty content)'}", api_key)
        return Failure("no_image", 200, message, request_id=request_id)
    return Success(images, text, usage, request_id, served_model(obj.get("modelVersion"), api_key))


def _image(inline: dict[str, Any], data: bytes | None, api_key: str | None, request_id: str | None) -> Image | Failure:
    mime = str(inline.get("mimeType", inline.get("mime_type", ""))).lower()
    if data is None:
        raw = inline.get("data")
        if not isinstance(raw, str):
            return Failure("invalid_response", 200, "inlineData has no data", request_id=request_id)
        try:  # proto3 JSON bytes: the standard alphabet, or the URL-safe one, padded or not
            encoded = raw.encode("ascii")
            encoded += b"=" * (-len(encoded) % 4)
            data = (binascii.a2b_base64(encoded, strict_mode=True) if b"-" not in encoded and b"_" not in encoded
                    else base64.urlsafe_b64decode(encoded))  # fmt: skip
        except (binascii.Error, ValueError):
            return Failure("invalid_response", 200, "image data is not valid base64", request_id=request_id)
    mime = "image/jpeg" if mime == "image/jpg" else mime
    if not is_whole_image(mime, data):
        why = clean_message(f"data claims {mime or 'no type'} but is not a whole one", api_key)
        return Failure("invalid_response", 200, why, request_id=request_id)
    return Image(data, mime)


def error_failure(error: dict[str, Any], api_key: str | None) -> Failure:
    """A Google error object (`{"code", "message", "status", "details"}`), wherever it came: as the
    same error answered with its HTTP status. A batch line's `code` is a google.rpc code."""
    code = error.get("code")
    rpc = isinstance(code, int) and not isinstance(code, bool) and code < 100
    status = RPC_STATUS.get(int(code or 0), 500) if rpc else error_status(error)
    body = json.dumps({"error": error}, default=str).encode()
    return classify(status, body, None, api_key)
