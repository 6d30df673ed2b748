"""Which fault a request gets (prompt markers, seeded random rates) and the sliding-window rate limit."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque

FAULT_KINDS: tuple[str, ...] = (
    "429", "429_noretry", "500", "500_empty", "502", "503", "504", "400", "400_relayed",
    "prompt_blocked", "401", "402", "403", "413", "drop", "truncate", "html", "empty",
    "badjson", "content_filter", "text_only", "not_image", "slow", "two_images",
    "same_image", "wrong_shape", "uniform", "gzip", "unicode",
    # Google's Batch API: a results line missing, or there twice; the batch holding the request ends FAILED or EXPIRED
    "missing", "duplicate", "batch_failed", "batch_expired",
)  # fmt: skip
# Gateway-level refusals: answered at once, without the generation latency.
IMMEDIATE = frozenset({"400", "401", "402", "403", "413", "429", "429_noretry"})
MARKER = re.compile(r"\[fault:([a-z0-9_]+?)(?:x(\d+))?\]")


class FaultPicker:
    """Prompt markers first (`[fault:KIND]` always, `[fault:KINDxN]` for the first N requests with the
    same key), then the configured random rates, drawn from an RNG seeded once per reset."""

    def __init__(self, rates: tuple[tuple[str, float], ...], seed: int) -> None:
        self._rates = rates
        self._seed = seed
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._uses: dict[tuple[str, int], int] = {}
            self._rng = random.Random(self._seed)

    def pick(self, prompt: str, key: str) -> str | None:
        """The fault for this request, or None; `key` tells requests apart for counted markers."""
        with self._lock:
            for position, match in enumerate(MARKER.finditer(prompt)):
                kind, times = match.group(1), match.group(2)
                if kind not in FAULT_KINDS:
                    continue
                if times is None:
                    return kind
                used = self._uses.get((key, position), 0)
                if used < int(times):
                    self._uses[(key, position)] = used + 1
                    return kind
            if self._rates:
                draw, total = self._rng.random(), 0.0
                for kind, rate in self._rates:
                    total += rate
                    if draw < total:
                        return kind
        return None


class RateWindow:
    """At most max(1, int(rpm * window_s / 60)) requests per sliding window of window_s seconds (rpm 0: no limit)."""

    def __init__(self, rpm: int, window_s: float) -> None:
        self._capacity = max(1, int(rpm * window_s / 60)) if rpm > 0 else 0
        self._window_s = window_s
        self._lock = threading.Lock()
        self._times: deque[float] = deque()

    def reset(self) -> None:
        with self._lock:
            self._times.clear()

    def admit(self) -> float | None:
        """None if a request may go now (and count it), else the seconds until a slot frees."""
        if not self._capacity:
            return None
        now = time.monotonic()
        with self._lock:
            while self._times and self._times[0] <= now - self._window_s:
                self._times.popleft()
            if len(self._times) >= self._capacity:
                return self._times[0] + self._window_s - now
            self._times.append(now)
        return None
