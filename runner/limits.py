"""Shared limits of a run: request rate, adaptive concurrency (AIMD) and the spending budget."""

from __future__ import annotations

import math

import anyio


class RateLimiter:
    """Spaces requests evenly at `per_minute` (no burst of a minute's quota in one second).

    Every attempt, retries included, takes a slot. A server's "wait N seconds" pauses
    every worker, since the limit is per key and all of them would be refused alike.
    """

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = -math.inf

    async def acquire(self) -> None:
        now = anyio.current_time()
        slot = max(now, self._next)
        self._next = slot + self.interval if self.interval else slot
        if slot > now:
            await anyio.sleep(slot - now)

    def pause(self, seconds: float) -> None:
        self._next = max(self._next, anyio.current_time() + seconds)


class AdaptiveConcurrency:
    """Additive-increase, multiplicative-decrease on the number of requests in flight.

    A burst of 429s halves the limit once (not once per 429); every `limit` successes
    in a row win back one slot, up to the configured concurrency.
    """

    def __init__(self, maximum: int, cooldown_s: float = 2.0) -> None:
        self.maximum = maximum
        self.limiter = anyio.CapacityLimiter(maximum)
        self.cooldown_s = cooldown_s
        self._last_cut = -math.inf
        self._streak = 0

    @property
    def limit(self) -> int:
        return int(self.limiter.total_tokens)

    def rate_limited(self) -> None:
        now = anyio.current_time()
        self._streak = 0
        if now - self._last_cut < self.cooldown_s:
            return
        self._last_cut = now
        if self.limit > 1:
            self.limiter.total_tokens = max(1, self.limit // 2)

    def succeeded(self) -> None:
        if self.limit >= self.maximum:
            return
        self._streak += 1
        if self._streak >= self.limit:
            self._streak = 0
            self.limiter.total_tokens = self.limit + 1


class Budget:
    """Stops new items once spent + in-flight estimates would pass `max_usd`."""

    def __init__(self, max_usd: float | None, spent_before: float) -> None:
        self.max_usd = max_usd
        self.spent = spent_before
        self.in_flight = 0.0

    def reserve(self, estimate: float) -> bool:
        if self.max_usd is not None and self.spent + self.in_flight + estimate > self.max_usd + 1e-9:
            return False
        self.in_flight += estimate
        return True

    def settle(self, estimate: float, actual: float) -> None:
        self.in_flight -= estimate
        self.spent += actual
