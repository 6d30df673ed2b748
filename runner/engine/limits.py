"""Limits of the interactive pool: an even request rate and adaptive concurrency (AIMD), on a clock that tests can replace."""

from __future__ import annotations

import math
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
    in a row win back one slot, up to the configured concurrency.
    """

    def __init__(self, maximum: int, cooldown_s: float = 2.0, clock: Clock = MONOTONIC) -> None:
        self.maximum = maximum
        self.clock = clock
        self.limiter = anyio.CapacityLimiter(maximum)
        self.cooldown_s = cooldown_s
        self._last_cut = -math.inf
        self._streak = 0

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
        return f"rate limited (429): concurrency lowered from {before} to {self.limit}"

    def succeeded(self) -> str | None:
        """A success came back; says so when the limit was raised."""
        if self.limit >= self.maximum:
            return None
        self._streak += 1
        if self._streak < self.limit:
            return None
        self._streak = 0
        self.limiter.total_tokens = self.limit + 1
        return f"{self.limit - 1} successes in a row: concurrency raised to {self.limit} (of {self.maximum})"
