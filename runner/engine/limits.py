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

    async def acquire(self, stopping: anyio.Event) -> bool:
        """Wait for the next slot; False when `stopping` is set first (send nothing then)."""
        now = anyio.current_time()
        slot = max(now, self._next)
        self._next = slot + self.interval if self.interval else slot
        if slot > now:
            with anyio.move_on_after(slot - now):
                await stopping.wait()
                return False
        return not stopping.is_set()

    def pause(self, seconds: float) -> bool:
        """Hold every request for `seconds`; True when this moved the pause later by a second or more."""
        until = anyio.current_time() + seconds
        later = until > self._next + 1.0
        self._next = max(self._next, until)
        return later


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

    def rate_limited(self) -> str | None:
        """A 429 came back; says so when the limit was lowered."""
        now = anyio.current_time()
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


class Budget:
    """Stops new items once spent + what the items in flight may cost would pass `max_usd`.

    An answer may hold several images, each billed: an item reserves its price times the
    most images an answer has held so far in this run (at least one)."""

    def __init__(self, max_usd: float | None, spent_before: float) -> None:
        self.max_usd = max_usd
        self.spent = spent_before
        self.in_flight = 0.0
        self.images_per_answer = 1

    def reserve(self, price: float) -> float | None:
        """The amount reserved for an item of this price per image, or None when it does not fit."""
        amount = price * self.images_per_answer
        if not self._fits(amount):
            return None
        self.in_flight += amount
        return amount

    def top_up(self, reserved: float, price: float) -> float | None:
        """An item's reservation raised to what its answer may cost now (answers of more images
        seen since it reserved), or None when that no longer fits: checked before each request."""
        amount = price * self.images_per_answer
        if amount <= reserved:
            return reserved
        if not self._fits(amount - reserved):
            return None
        self.in_flight += amount - reserved
        return amount

    def _fits(self, more: float) -> bool:
        return self.max_usd is None or self.spent + self.in_flight + more <= self.max_usd + 1e-9

    def settle(self, reserved: float, actual: float, images: int) -> None:
        self.in_flight -= reserved
        self.spent += actual
        self.images_per_answer = max(self.images_per_answer, images)
