"""What to do with every outcome: retry it, fail the item, or abort the run; and how long to wait."""

from __future__ import annotations

import email.utils
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tenacity import RetryCallState, wait_random_exponential
from tenacity.stop import stop_base

from .safety import MAX_MESSAGE, clean_message


class Action(Enum):
    RETRY = "retry"  # try the item again after a backoff, up to max_attempts
    FAIL = "fail"  # record the item as failed now; a rerun with --retry-failed tries it again
    ABORT = "abort"  # stop the whole run: no other request can succeed either


@dataclass(frozen=True)
class Rule:
    action: Action
    systemic: bool  # counts towards the circuit breaker (a fault of the service, not of one prompt)
    what: str


# The one table of outcomes; README.md shows it (tests check the two agree).
POLICY: dict[str, Rule] = {
    "rate_limited": Rule(
        Action.RETRY, True, "429: wait Retry-After / retryDelay if given, else backoff; concurrency halves"
    ),
    "server_error": Rule(Action.RETRY, True, "500, 502, 503, 504 and other 5xx (overloaded, empty_response)"),
    "timeout": Rule(Action.RETRY, True, "no complete answer within timeout_s"),
    "connection": Rule(Action.RETRY, True, "connection refused, dropped or cut off mid-body"),
    "invalid_response": Rule(
        Action.RETRY,
        True,
        "malformed HTTP, a body that is not the expected JSON, or a corrupt image (too big: no retry)",
    ),
    "bad_request": Rule(Action.FAIL, True, "400, 413, 422: the request itself is wrong; retrying cannot help"),
    "prompt_blocked": Rule(Action.FAIL, False, "400 prompt_blocked: the prompt was refused"),
    "content_filter": Rule(Action.FAIL, False, "200 with finish_reason content_filter: the image was blocked"),
    "no_image": Rule(Action.FAIL, False, "200 with text but no image"),
    "auth": Rule(Action.ABORT, True, "401: the key is missing or wrong"),
    "no_balance": Rule(Action.ABORT, True, "402: no balance left on the key"),
    "forbidden": Rule(Action.ABORT, True, "403: the key may not use this model"),
    "not_found": Rule(Action.ABORT, True, "404 or a redirect: wrong base_url"),
    "certificate": Rule(
        Action.ABORT,
        True,
        "the gateway's TLS certificate cannot be verified (a private CA: SSL_CERT_FILE, SSL_CERT_DIR)",
    ),
    "internal": Rule(
        Action.FAIL, True, "a bug in runner while handling this item (details in the log); rerun retries it"
    ),
}

# Only these stay failed on a rerun (until --retry-failed); an item cut short by an abort is retried,
# and so is one a bug stopped (the next version may not have it).
PERMANENT = frozenset(k for k, r in POLICY.items() if r.action is Action.FAIL and k != "internal")
MAX_SERVER_WAIT_S = 300.0  # never wait longer than this on a server's say-so


@dataclass(frozen=True)
class Failure:
    kind: str
    status: int | None
    message: str
    retry_after: float | None = None  # seconds the server asked us to wait
    request_id: str | None = None
    final: bool = False  # retrying in this run cannot help (an answer over max_response_mb)

    @property
    def action(self) -> Action:
        rule = POLICY[self.kind].action
        return Action.FAIL if self.final and rule is Action.RETRY else rule


def classify_status(status: int, body: bytes, headers: Any, api_key: str | None) -> Failure:
    """Turn a non-200 answer into a Failure, whatever the body looks like."""
    message, code, etype, delay = _error_fields(body)
    if status == 429:
        kind = "rate_limited"
    elif status >= 500:
        kind = "server_error"
    elif status == 401:
        kind = "auth"
    elif status == 402:
        kind = "no_balance"
    elif status == 403:
        kind = "forbidden"
    elif status == 404 or 300 <= status < 400:
        kind = "not_found"
        if headers is not None and headers.get("location"):
            message = f"HTTP {status}, redirected to {headers.get('location')}: check base_url"
    elif "prompt_blocked" in (str(code), str(etype)):
        kind = "prompt_blocked"
    else:
        kind = "bad_request"
    wait = parse_retry_after(headers.get("retry-after")) if headers is not None else None
    if wait is None:
        wait = delay
    if wait is not None:
        wait = min(wait, MAX_SERVER_WAIT_S)  # the wait also pauses every worker: never for hours
    return Failure(kind, status, clean_message(message or f"HTTP {status}", api_key), wait)


# An error object's `type` / `status` / `code` names (OpenAI, LiteLLM, Google) as the HTTP status the same error has.
_ERROR_NAMES = {
    429: ("rate_limit", "resource_exhausted", "too_many_requests", "quota_exceeded"),
    401: ("authentication", "unauthenticated", "invalid_api_key", "unauthorized"),
    402: ("insufficient_quota", "insufficient_balance", "insufficient_credits", "payment_required", "billing"),
    403: ("permission", "forbidden", "access_denied"),
    404: ("not_found",),
    400: ("prompt_blocked", "invalid_request", "invalid_argument", "bad_request", "failed_precondition"),
}


def error_status(error: Mapping[str, Any], default: int = 500) -> int:
    """The HTTP status an error object stands for, wherever it came (a 200 whose body is an error, a
    batch line): its `code` when that is an HTTP status (a number or digits), else what its `type`,
    `status` or `code` names; `default` (a server error) when nothing says."""
    code = error.get("code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code.strip())
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    names = " ".join(str(error.get(k)).lower() for k in ("type", "status", "code") if isinstance(error.get(k), str))
    for status, words in _ERROR_NAMES.items():
        if any(w in names for w in words):
            return status
    return default


def classify_error(error: Mapping[str, Any], api_key: str | None, status: int | None = None) -> Failure:
    """An error object (`{"message", "type", "code", ...}`) found inside an answer, as the same error
    answered with its HTTP status (`status`, else error_status): a 402 in a 200 is no balance."""
    body = json.dumps({"error": dict(error)}, default=str).encode()
    return classify_status(error_status(error) if status is None else status, body, None, api_key)


def _error_fields(body: bytes) -> tuple[str, Any, Any, float | None]:
    """(message, code, type, retryDelay seconds) from an error body; tolerant of anything."""
    text = body[:20_000].decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        snippet = re.sub(r"<[^>]*>", " ", text)  # an HTML error page: keep its words
        return " ".join(snippet.split())[:MAX_MESSAGE], None, None, _retry_delay(text)
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return text[:MAX_MESSAGE], None, None, _retry_delay(text)
    message = err.get("message")
    message = str(message) if message is not None else text[:MAX_MESSAGE]
    # LiteLLM relays Google's 429 as JSON inside error.message, its quotes escaped in the body.
    return message, err.get("code"), err.get("type"), _retry_delay(text) or _retry_delay(message)


def _retry_delay(text: str) -> float | None:
    # Google's RetryInfo: "retryDelay": "13s"; its message also says "Please retry in 13.2s".
    m = re.search(r'"retryDelay"\s*:\s*"(\d+(?:\.\d+)?)s"', text) or re.search(
        r"retry in (\d+(?:\.\d+)?)\s*s", text, re.IGNORECASE
    )
    return float(m.group(1)) if m else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ServerWaitOrBackoff(wait_random_exponential):
    """tenacity's exponential backoff with full jitter, capped; but a server's own wait
    (Retry-After, retryDelay) wins when the last answer gave one, with a little jitter so a
    crowd of workers does not come back at one instant."""

    def __init__(self, base_s: float = 1.0, cap_s: float = 60.0) -> None:
        super().__init__(multiplier=base_s, max=cap_s)
        self.base_s = base_s

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        failure = outcome.result() if outcome is not None and not outcome.failed else None
        if isinstance(failure, Failure) and failure.retry_after is not None:
            return failure.retry_after + random.uniform(0, min(1.0, self.base_s))
        return float(super().__call__(retry_state))


class CircuitBreaker:
    """Trips after `limit` consecutive systemic item failures of one kind; any success resets it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kind: str | None = None
        self.count = 0

    def success(self) -> None:
        self.kind, self.count = None, 0

    def failure(self, kind: str) -> bool:
        """Record a failed item; True when the run should stop."""
        if not POLICY[kind].systemic:
            return False
        if kind == self.kind:
            self.count += 1
        else:
            self.kind, self.count = kind, 1
        return self.count >= self.limit


class StopWhen(stop_base):
    """tenacity's stop condition for "the run or this item is stopping" (Ctrl+C, abort, budget)."""

    def __init__(self, stopping: Callable[[RetryCallState], bool]) -> None:
        self.stopping = stopping

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.stopping(retry_state)
