"""Read a 200 answer: images from Markdown content or message.images, or the Failure it really is."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from ..imageinfo import is_whole_image
from ..policy import Failure, classify_error
from ..safety import MAX_TEXT, clean_message, json_int, safe_json, safe_text

_B64_STEP = 1 << 20  # base64 characters decoded per step (a multiple of 4)
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,([A-Za-z0-9+/=\s]*)")
_EMPTY_MARKDOWN = re.compile(r"!\[[^\]\n]{0,200}\]\(\s{0,8}\)")  # bounded: no quadratic backtracking
MAX_DOCUMENT = 2 << 20  # an answer's JSON once its images are out: more is not an image generation
MAX_IMAGES = 16  # per answer; more is a broken or hostile server, not a generation


@dataclass(frozen=True)
class Image:
    data: bytes
    mime: str


@dataclass(frozen=True)
class Success:
    images: list[Image]
    text: str
    usage: dict[str, Any] | None
    request_id: str | None
    model: str | None = None  # the model the answer says served it (made safe), when it says


Outcome = Success | Failure


def parse_completion(body: bytes | bytearray, api_key: str | None = None) -> Outcome:
    """A 200 answer -> Success with decoded, checked images, or the Failure it really is."""
    cut = _cut_images(body)
    if cut is not None:
        outcome = _parse(cut[0], cut[1], api_key)
        if outcome is not None:
            return outcome
    return _parse(body, None, api_key) or Failure("invalid_response", 200, "unreadable answer")


def _cut_images(body: bytes | bytearray) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """Take the base64 images out of the raw body before JSON parsing, decoding them in steps.

    A 4K answer is 20 MB of base64: parsing it as JSON, then matching and decoding it as a
    string, holds the GIL for ~140 ms in a few calls and keeps several copies alive. Cut out
    of the bytes and decoded a MiB at a time, it takes ~50 ms in short steps. The base64 ends
    at `)` (Markdown in content) or `"` (a message.images url). Anything unusual (escapes,
    whitespace) returns None: the plain path handles it."""
    if body.find(b"data:image/") < 0:
        return None
    view = memoryview(body)
    parts: list[bytes] = []
    images: list[tuple[str, bytes]] = []
    pos = 0
    while (i := body.find(b"data:image/", pos)) >= 0:
        if len(images) >= MAX_IMAGES:
            return None
        j = body.find(b";base64,", i, i + 80)
        if j < 0:
            return None
        ends = [e for e in (body.find(b")", j), body.find(b'"', j)) if e >= 0]
        if not ends:
            return None
        end = min(ends)
        try:
            chunks = [
                binascii.a2b_base64(view[k : min(k + _B64_STEP, end)], strict_mode=True)
                for k in range(j + 8, end, _B64_STEP)
            ]
        except binascii.Error:
            return None
        images.append((bytes(body[i + 5 : j]).decode("ascii", "replace").lower(), b"".join(chunks)))
        parts.append(bytes(view[pos : j + 8]))
        pos = end
    parts.append(bytes(view[pos:]))
    return b"".join(parts), images


def _decode_uris(text: str) -> list[tuple[str, bytes]] | None:
    found = []
    for m in _DATA_URI.finditer(text):
        try:
            found.append((m.group(1).lower(), base64.b64decode(m.group(2), validate=False)))
        except (binascii.Error, ValueError):
            return None
    return found


def _image_urls(message: dict[str, Any]) -> list[str] | None:
    """The urls of `message.images` (OpenRouter, LiteLLM): [] when absent, None when malformed."""
    images = message.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        return None
    urls = []
    for entry in images:
        url = _image_url(entry)
        if not isinstance(url, str):
            return None
        urls.append(url)
    return urls


def _image_url(part: Any) -> Any:
    """The url of an `image_url` part: {"image_url": {"url": ...}}, or {"image_url": "..."}."""
    url = part.get("image_url") if isinstance(part, dict) else None
    return url.get("url") if isinstance(url, dict) else url


def _content_text(content: Any) -> tuple[str, list[str]] | None:
    """(text, image urls) of a message content: a string, or a list of text / image_url parts."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        return None
    texts, urls = [], []
    for part in content:
        if not isinstance(part, dict):
            return None
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        url = _image_url(part)
        if isinstance(url, str):
            urls.append(url)
    return "\n".join(texts), urls


def _parse(doc: bytes | bytearray, cut: list[tuple[str, bytes]] | None, api_key: str | None) -> Outcome | None:
    """Classify a parsed answer; `cut` holds images already taken out of `doc` (None if not).

    Returns None when the cut images do not match the answer (the caller parses plainly)."""
    if len(doc) > MAX_DOCUMENT and (cut is not None or doc.find(b"data:image") < 0):  # or data:image\/png
        # Parsing megabytes of JSON that carry no image costs many times their size in memory.
        what = "besides its images" if cut is not None else "and no image"
        too_much = f"answer has {len(doc) / 2**20:.1f} MB of JSON {what}: not an image generation"
        return Failure("invalid_response", 200, too_much, final=True)
    try:
        obj = loads(doc)
    except (ValueError, RecursionError) as e:
        if cut is not None:
            return None
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{bytes(doc[:120])!r}"
        return Failure("invalid_response", 200, clean_message(f"body is not JSON: {why}", api_key))
    if not isinstance(obj, dict):
        return Failure("invalid_response", 200, "answer is not a JSON object")
    raw_id = obj.get("id")
    request_id = safe_text(raw_id, api_key, keep_newlines=False, limit=200) if isinstance(raw_id, str) else None
    choices = obj.get("choices")
    if isinstance(obj.get("error"), dict) and not choices:  # an error inside a 200: read as the error it is
        return dataclasses.replace(classify_error(obj["error"], api_key), request_id=request_id)
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return Failure("invalid_response", 200, "answer has no choices[0].message", request_id=request_id)
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    usage = safe_json(obj["usage"], api_key) if isinstance(obj.get("usage"), dict) else None
    read = _content_text(message.get("content"))
    urls = _image_urls(message)
    if read is None or urls is None:
        return Failure("invalid_response", 200, "message content or images are malformed", request_id=request_id)
    content, part_urls = read
    urls += part_urls
    uris_in_content = content.count("data:image/")
    if cut is not None and uris_in_content + sum(u.count("data:image/") for u in urls) != len(cut):
        return None  # an image in a form we did not cut: parse plainly
    if cut is not None:
        found: list[tuple[str, bytes]] | None = cut
    else:
        found = _decode_uris(content)
        for url in urls:
            decoded = _decode_uris(url)
            found = None if found is None or decoded is None else found + decoded
    if found is None:
        return Failure("invalid_response", 200, "image data is not valid base64", request_id=request_id)
    if len(found) > MAX_IMAGES:
        return Failure("invalid_response", 200, f"answer holds {len(found)} images", request_id=request_id)
    images: list[Image] = []
    seen: list[bytes] = []  # not a set: hashing a 4 MB image costs more than comparing a few
    for mime, data in found:
        if data in seen:  # the same image in the content and in message.images: one image, billed once
            continue
        seen.append(data)
        if not is_whole_image(mime, data):
            why = clean_message(f"data claims {mime} but is not a whole one", api_key)
            return Failure("invalid_response", 200, why, request_id=request_id)
        images.append(Image(data, "image/jpeg" if mime == "image/jpg" else mime))
    text = _DATA_URI.sub("", content)[: 2 * MAX_TEXT]  # capped before any further pattern runs on it
    text = _EMPTY_MARKDOWN.sub("", text).strip()
    text = safe_text(text, api_key)
    if finish == "content_filter":
        why = f": {text[:200]}" if text else ""
        return Failure(
            "content_filter",
            200,
            clean_message(f"image blocked by the safety filter{why}", api_key),
            request_id=request_id,
        )
    if not images:
        said = f": {text[:200]}" if text else " (empty content)"
        return Failure("no_image", 200, clean_message(f"answer has no image{said}", api_key), request_id=request_id)
    return Success(images, text, usage, request_id, served_model(obj.get("model"), api_key))


def loads(doc: bytes | bytearray) -> Any:
    """json.loads of an answer; an integer of more than 4300 digits (which Python refuses to read,
    and which would make a paid answer unreadable) is read as None, the others as they are (safe_json
    clamps them where they are kept). The callback only on that rare retry: it costs on every int."""
    try:
        return json.loads(doc)
    except ValueError as e:
        if "integer string conversion" not in str(e):
            raise
    return json.loads(doc, parse_int=json_int)


def served_model(value: Any, api_key: str | None) -> str | None:
    """An answer's `model` (or Google's `modelVersion`) as it may be stored: short, one line, safe."""
    return _safe_model(value[:400], api_key) if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=16)
def _safe_model(value: str, api_key: str | None) -> str:
    return safe_text(value, api_key, keep_newlines=False, limit=200)  # every answer names its model: once each
