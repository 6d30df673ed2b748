"""The spending budget: no item starts, and no request goes, past what `max_cost_usd` leaves."""

from __future__ import annotations


class Budget:
    """Stops new items once spent + what the items in flight may cost would pass `max_usd`.

    An answer may hold several images, each billed: an item reserves its price times the
    most images an answer has held so far in this run (at least one)."""

    def __init__(self, max_usd: float | None, spent_before: float, in_flight: float = 0.0) -> None:
        self.max_usd = max_usd
        self.spent = spent_before
        self.in_flight = in_flight  # e.g. batches submitted by an earlier run and not yet collected
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
