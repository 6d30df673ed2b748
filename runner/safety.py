"""Text from a server or a manifest made safe: storable (no lone surrogates), printable (no escapes acted on), keyless."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from typing import Any

MAX_MESSAGE = 300  # characters of a server's error message kept
_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|Bearer\s+\S+)")


def clean_message(message: str, api_key: str | None) -> str:
    """A server message made fit for a manifest line and a terminal: one line, trimmed, no
    control characters, no lone surrogates, nothing that could be the key."""
    message = " ".join(safe_text(message, api_key, keep_newlines=False).split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


# C0 and C1 controls, DEL, and the bidi overrides that make a terminal show one thing and mean another.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_NL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_TEXT = 20_000  # characters of a server's free text kept on a manifest line


def safe_text(text: str, api_key: str | None, *, keep_newlines: bool = True, limit: int = MAX_TEXT) -> str:
    """Server text made storable and printable: lone surrogates replaced (they cannot be
    encoded as UTF-8), control characters removed (escape sequences would reach a terminal),
    the key and anything key-like scrubbed, the length capped; in that order, so neither a
    control character inside the key nor the cap through the middle of it can save it."""
    text = text[: 2 * limit + 512]  # bound the work; the final cut below is well inside this
    if not text.isascii():  # encoding through UTF-16 pairs up valid surrogate pairs and replaces lone ones
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = (_CONTROL if keep_newlines else _CONTROL_NL).sub("", text)
    if api_key:
        text = _scrub_key(text, api_key)
    text = _SECRETISH.sub("[key]", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _scrub_key(text: str, key: str) -> str:
    """The key, and any 8 characters in a row of it (a key cut in pieces), replaced."""
    text = text.replace(key, "[key]")
    pieces, lookup = _key_pieces(key)
    # A short text (an id, a usage key: several per answer) looks its own 8-grams up at once.
    if len(text) < 8 or (len(text) < len(pieces) and lookup.isdisjoint(_grams(text))):
        return text
    for piece in pieces:
        if piece in text:
            text = text.replace(piece, "[key]")
    return text


@functools.lru_cache(maxsize=8)
def _key_pieces(key: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The key's 8-character pieces in order, and as a set."""
    pieces = tuple(dict.fromkeys(_grams(key)))
    return pieces, frozenset(pieces)


def _grams(text: str) -> Iterator[str]:
    return (text[i : i + 8] for i in range(len(text) - 7))


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def json_int(text: str) -> int | None:
    """A JSON integer literal from a server, as `json.loads(parse_int=...)` reads it: None when it
    does not fit a signed 64-bit integer (no loader can hold it; Python itself refuses to read one
    of more than 4300 digits, which would make a paid answer unreadable)."""
    if len(text) > 20:
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def safe_json(value: Any, api_key: str | None, depth: int = 0) -> Any:
    """A JSON value from a server (usage, say) made safe to store: every string through
    safe_text, numbers that no loader can hold dropped (integers outside int64, NaN and
    infinities: None, never a JSON number), depth and size bounded."""
    if isinstance(value, str):
        return safe_text(value, api_key, limit=1000)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= 4:
        return None
    if isinstance(value, dict):
        items = list(value.items())[:50]
        return {safe_text(str(k), api_key, limit=100): safe_json(v, api_key, depth + 1) for k, v in items}
    if isinstance(value, list):
        return [safe_json(v, api_key, depth + 1) for v in value[:50]]
    return None


def printable(text: str) -> str:
    """Text from a manifest or a server, fit for a terminal: controls shown as escapes, never acted on."""
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
