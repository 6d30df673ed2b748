"""Reading a chat request as the gateway would: model, prompt, reference images, image config and parameters."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..imageinfo import dimensions
from ..models import MODELS, effective_size, nearest_ratio
from .bodies import error_body
from .images import PNG_SIGNATURE

FLAVORS = ("nanobanana", "openai-compatible", "gemini")  # gemini: Google's own API is the base_url
# Google's limits per request: Gemini 2.5 Flash Image takes up to 3 images, 3 Pro and 3.1 Flash up to 14.
MAX_INPUT_IMAGES = {"nanobanana": 3, "nanobanana_pro": 14, "nanobanana_2": 14}
MAX_REQUEST_BYTES = 20 * 1024 * 1024
DIGEST_PARAMS = ("seed", "temperature", "top_p")
_HEIF_BRANDS = {b"heic", b"heix", b"mif1", b"msf1", b"heif"}
_INPUT_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
_INT32 = 2**31


class Rejected(Exception):
    """The request is refused with this status and JSON body."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.body = error_body(message, "invalid_request_error", "invalid_parameter", param)


@dataclass
class Generation:
    """A valid request: what the image depends on, plus how it is to be answered."""

    model: str
    prompt: str
    aspect_ratio: str
    size: str
    inputs: list[str]
    params: dict[str, Any]
    text_only: bool = False
    digest: bytes = field(init=False)

    def __post_init__(self) -> None:
        hexdigest = request_digest(self.model, self.prompt, self.aspect_ratio, self.size, self.inputs, self.params)
        self.digest = bytes.fromhex(hexdigest)


def request_digest(
    model: str, prompt: str, aspect_ratio: str, image_size: str, inputs: list[str], params: dict[str, Any]
) -> str:
    """The hex sha256 every image of a request derives from (its PNG tEXt `runner-mock-request`).

    `image_size` is the size produced (the model's default when none was sent); `inputs` are the
    reference images in order, each the sha256 hex of its decoded bytes or its URL text; of
    `params` only seed, temperature and top_p count (1 and 1.0 are the same temperature)."""
    canon = sorted(
        (k, int(v) if k == "seed" else float(v)) for k, v in params.items() if k in DIGEST_PARAMS and v is not None
    )
    blob = json.dumps([model, aspect_ratio, image_size, prompt, list(inputs), canon])
    return hashlib.sha256(blob.encode()).hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _params(data: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters sent (nulls count as absent), each checked as Google checks it."""
    params: dict[str, Any] = {}
    seed = data.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed == 0 or not -_INT32 <= seed < _INT32:
            raise Rejected(f"seed must be a non-zero 32-bit integer, not {seed!r}", "seed")
        params["seed"] = seed
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = data.get(name)
        if value is not None:
            if not _is_number(value) or not 0.0 <= value <= high:
                raise Rejected(f"{name} must be a number from 0 to {high:g}, not {value!r}", name)
            params[name] = value
    tokens = data.get("max_tokens")
    if tokens is not None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise Rejected(f"max_tokens must be a positive integer, not {tokens!r}", "max_tokens")
        params["max_tokens"] = tokens
    if data.get("n") not in (None, 1):
        raise Rejected("Multiple candidates is not enabled for this model", "n")
    return params


def _magic_ok(mime: str, data: bytes) -> bool:
    if mime == "image/png":
        return data.startswith(PNG_SIGNATURE)
    if mime == "image/jpeg":
        return data.startswith(b"\xff\xd8\xff")
    if mime == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    # HEIC/HEIF: an ISO-BMFF `ftyp` box first, with a HEIF brand as the major or a compatible brand.
    if data[4:8] != b"ftyp":
        return False
    end = min(len(data), int.from_bytes(data[:4], "big"), 256)  # a real ftyp box is tiny; never scan megabytes
    brands = {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}
    return bool(brands & _HEIF_BRANDS)


def _input_image(part: dict[str, Any], where: str, shapes: list[tuple[int, int] | None] | None = None) -> str:
    """The identity of one image part: the sha256 hex of a data URI's bytes, or an http(s) URL as is.
    `shapes` gets the image's (width, height), or None where it cannot be known (a URL, an odd header)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not url:
        raise Rejected(f"{where}: image_url must be an object with a non-empty url", where)
    if url.startswith(("http://", "https://")):
        if not url.partition("://")[2].split("/", 1)[0]:
            raise Rejected(f"{where}: the image URL has no host", where)
        if shapes is not None:
            shapes.append(None)  # the gateway would fetch it; the mock does not
        return url
    if not url.startswith("data:"):
        raise Rejected(f"{where}: the image url must be a data URI or an http(s) URL", where)
    header, comma, payload = url[5:].partition(",")
    mime, *options = header.split(";")
    mime = mime.strip().lower()
    if not comma or "base64" not in options:
        raise Rejected(f"{where}: the data URI must be base64 (data:image/...;base64,...)", where)
    if mime not in _INPUT_MIMES:
        raise Rejected(f"{where}: unsupported image mime type {mime!r}; use one of {', '.join(_INPUT_MIMES)}", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(f"{where}: the data URI is not valid base64", where) from None
    if not _magic_ok(mime, data):
        raise Rejected(f"{where}: the image data is not a valid {mime} file", where)
    if shapes is not None:
        shapes.append(dimensions(data))
    return hashlib.sha256(data).hexdigest()


def _prompt(
    data: dict[str, Any], entry: dict[str, Any], shapes: list[tuple[int, int] | None] | None = None
) -> tuple[str, list[str]]:
    """The last user message: its text (text parts joined by newlines) and its images' identities in order
    (their shapes into `shapes`)."""
    messages = data.get("messages")
    users: list[int] = []
    if isinstance(messages, list):
        users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(messages, list):
        raise Rejected("messages must be a non-empty list with a user message", "messages")
    at = f"messages[{users[-1]}].content"
    content = messages[users[-1]].get("content")
    if isinstance(content, str):
        if not content.strip():
            raise Rejected(f"{at}: the last user message must have non-empty content", at)
        entry["prompt"] = content
        return content, []
    if not isinstance(content, list) or not content:
        raise Rejected(f"{at}: the last user message must be a string or a non-empty list of parts", at)
    texts: list[str] = []
    inputs: list[str] = entry["inputs"]
    for i, part in enumerate(content):
        where = f"{at}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part, dict):
            if not isinstance(part.get("text"), str):
                raise Rejected(f"{where}: a text part needs a string text", where)
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part, dict):
            inputs.append(_input_image(part, where, shapes))
        else:
            raise Rejected(f"{where}: unsupported content part {kind!r}; use text or image_url", where)
    if not any(text.strip() for text in texts):
        raise Rejected(f"{at}: the last user message needs a non-empty text part", at)
    entry["prompt"] = "\n".join(texts)
    return entry["prompt"], inputs


def _image_config(data: dict[str, Any], flavor: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The image config where this flavour reads it (the other place is ignored), checked key by key."""
    if flavor == "nanobanana":
        extra = data.get("extra_body") or {}
        google = extra.get("google") or {} if isinstance(extra, dict) else None
        if not isinstance(google, dict):
            raise Rejected("extra_body and extra_body.google must be objects", "extra_body")
        if "imageConfig" in google:
            raise Rejected("unknown field imageConfig in extra_body.google", "extra_body.google.imageConfig")
        where, source, config = "extra_body.google.image_config", "extra_body", google.get("image_config")
    else:
        where, source, config = "image_config", "top_level", data.get("image_config")
    if config is None:
        return {}
    entry["image_config"], entry["config_from"] = config, source
    if not isinstance(config, dict):
        raise Rejected("image_config must be an object", where)
    for key in config:
        if key not in ("aspect_ratio", "image_size"):
            raise Rejected(f"unknown field {key!r} in image_config", f"{where}.{key}")
    return config


def _text_only(data: dict[str, Any]) -> bool:
    """openai-compatible: `modalities` without "image" asks for a text answer."""
    modalities = data.get("modalities")
    if modalities is None:
        return False
    if not isinstance(modalities, list) or not all(m in ("text", "image") for m in modalities) or not modalities:
        raise Rejected(f"modalities must be a list of 'text' and 'image', not {modalities!r}", "modalities")
    return "image" not in modalities


def parse_request(body: bytes, flavor: str, entry: dict[str, Any]) -> Generation:
    """The request as a Generation, or Rejected; fills `entry` (a requests_log line) as far as it gets."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Rejected("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Rejected("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or model not in MODELS:
        raise Rejected(f"model {model!r} is not supported; use one of {', '.join(MODELS)}", "model")
    entry["model"] = model
    if data.get("stream") not in (None, False):
        raise Rejected("stream must be false for image generation", "stream")
    if flavor == "openai-compatible" and "extra_body" in data:
        raise Rejected('Invalid JSON payload received. Unknown name "extra_body": Cannot find field.', "extra_body")
    entry["params"] = params = _params(data)
    shapes: list[tuple[int, int] | None] = []
    prompt, inputs = _prompt(data, entry, shapes)
    if len(inputs) > MAX_INPUT_IMAGES[model]:
        limit = MAX_INPUT_IMAGES[model]
        raise Rejected(f"too many input images ({len(inputs)}): {model} takes at most {limit}", "messages")
    config = _image_config(data, flavor, entry)
    info = MODELS[model]
    ratio = config.get("aspect_ratio")
    if ratio is None:  # none sent: Google keeps the first reference image's shape
        ratio = input_ratio(model, shapes)
    if ratio not in info.aspect_ratios:
        raise Rejected(f"aspect_ratio {ratio!r} is not supported by {model}", "aspect_ratio")
    size = config.get("image_size")
    if info.sizes and size is not None and size not in info.sizes:
        raise Rejected(f"image_size {size!r} is not supported by {model}", "image_size")
    text_only = flavor == "openai-compatible" and _text_only(data)
    size = effective_size(model, size if info.sizes else None)
    return Generation(model, prompt, ratio, size, inputs, params, text_only)


def input_ratio(model: str, shapes: list[tuple[int, int] | None]) -> str:
    """The aspect ratio of a request that sends none, as Google chooses it: the supported ratio nearest
    to the first reference image's shape; a square without reference images (or when the first one's
    shape is unknown)."""
    first = shapes[0] if shapes else None
    return nearest_ratio(model, *first) if first else "1:1"
