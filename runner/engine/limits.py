"""Limits of the interactive pool: an even request rate and adaptive concurrency (AIMD), on a clock that tests can replace."""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

import anyio


class Clock(Protocol):
    """Time as the limits see it: anyio's monotonic clock, or a fake one in tests."""

    def now(self) -> float: ...

    async def wait(self, seconds: float, stopping: anyio.Event) -> bool:
        """Wait `seconds`; False when `stopping` is set first."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return anyio.current_time()

    async def wait(self, seconds: float, stopping: anyio.Event) -> bool:
        with anyio.move_on_after(seconds):
            await stopping.wait()
            return False
        return True


MONOTONIC = MonotonicClock()


class RateLimiter:
    """Spaces requests evenly at `per_minute` (no burst of a minute's quota in one second).

    Every attempt, retries included, takes a slot. A server's "wait N seconds" pauses
    every worker, since the limit is per key and all of them would be refused alike.
    """

    def __init__(self, per_minute: float, clock: Clock = MONOTONIC) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.clock = clock
        self._next = -math.inf

    async def acquire(self, stopping: anyio.Event) -> bool:
        """Wait for the next slot; False when `stopping` is set first (send nothing then)."""
        now = self.clock.now()
        slot = max(now, self._next)
        self._next = slot + self.interval if self.interval else slot
        if slot > now and not await self.clock.wait(slot - now, stopping):
            return False
        return not stopping.is_set()

    def pause(self, seconds: float) -> bool:
        """Hold every request for `seconds`; True when this moved the pause later by a second or more."""
        until = self.clock.now() + seconds
        later = until > self._next + 1.0
        self._next = max(self._next, until)
        return later


class AdaptiveConcurrency:
    """Additive-increase, multiplicative-decrease on the number of requests in flight.

    A burst of 429s halves the limit once (not once per 429); every `limit` successes
    in a row win back one slot, up to the configured concurrency. Each change is said once
    (the same change again within `repeat_s` is not said again: a night of 429s is a few lines,
    not hundreds), a cut with the request rate measured when the 429s came (`sent()` counts
    requests), and the requests_per_minute that would stay under it.
    """

    WINDOW_S = 60.0  # the request rate is measured over the last minute

    def __init__(
        self, maximum: int, cooldown_s: float = 2.0, clock: Clock = MONOTONIC, repeat_s: float = 600.0
    ) -> None:
        self.maximum = maximum
        self.clock = clock
        self.limiter = anyio.CapacityLimiter(maximum)
        self.cooldown_s = cooldown_s
        self.repeat_s = repeat_s
        self._last_cut = -math.inf
        self._streak = 0
        self._sent: deque[float] = deque()
        self._said: dict[tuple[int, int], float] = {}  # (from, to) -> when it was last said

    def sent(self) -> None:
        """A request went out (for the rate a 429 reports)."""
        now = self.clock.now()
        self._sent.append(now)
        while self._sent and self._sent[0] < now - self.WINDOW_S:
            self._sent.popleft()

    def per_minute(self) -> float:
        """Requests sent per minute over the last minute (over the time since the first, if shorter)."""
        now = self.clock.now()
        while self._sent and self._sent[0] < now - self.WINDOW_S:
            self._sent.popleft()
        if not self._sent:
            return 0.0
        span = max(1.0, min(self.WINDOW_S, now - self._sent[0]))
        return len(self._sent) * 60.0 / span

    def _say(self, before: int, after: int) -> bool:
        """Is this change worth a line (not said in the last repeat_s)?"""
        now = self.clock.now()
        last = self._said.get((before, after), -math.inf)
        if now - last < self.repeat_s:
            return False
        self._said[(before, after)] = now
        return True

    @property
    def limit(self) -> int:
        return int(self.limiter.total_tokens)

    def rate_limited(self) -> str | None:
        """A 429 came back; says so when the limit was lowered."""
        now = self.clock.now()
        self._streak = 0
        if now - self._last_cut < self.cooldown_s:
            return None
        self._last_cut = now
        if self.limit <= 1:
            return None
        before = self.limit
        self.limiter.total_tokens = max(1, before // 2)
        if not self._say(before, self.limit):
            return None
        rate = round(self.per_minute())
        if not rate:  # nothing sent in the last minute that was counted: no rate to report
            return f"rate limited (429): concurrency lowered from {before} to {self.limit}; set requests_per_minute"
        suggested = max(1, rate * 4 // 5)  # a fifth under what was refused
        return (
            f"rate limited (429) at ~{rate} requests/minute: concurrency lowered from {before} to {self.limit}; "
            f"set requests_per_minute to stay under the limit (e.g. requests_per_minute: {suggested})"
        )

    def succeeded(self) -> str | None:
        """A success came back; says so when the limit was raised."""
        if self.limit >= self.maximum:
            return None
        self._streak += 1
        if self._streak < self.limit:
            return None
        self._streak = 0
        self.limiter.total_tokens = self.limit + 1
        if not self._say(self.limit - 1, self.limit):
            return None
        streak = self.limit - 1
        return f"{streak} success{'' if streak == 1 else 'es'} in a row: concurrency raised to {self.limit} (of {self.maximum})"
