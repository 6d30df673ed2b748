"""Prices per image and per reference image (the built-in list prices under the spec's overrides), and money's one rounding rule."""

from __future__ import annotations

from collections.abc import Iterable

from .models import MODELS, effective_size
from .spec.items import Item
from .spec.parse import JobSpec

INPUT_IMAGE = "input_image"  # the pricing key of a reference image's price


BATCH_DISCOUNT = 0.5  # Google's Batch Mode: half the interactive price (shared/gemini-batch-api.md)


class PriceTable:
    """The built-in list prices (runner/models.py, with their source) under the spec's overrides.

    With `batch`, the built-in prices are Google's batch prices (half); prices the spec gives in
    `pricing` are used as they are (write what you pay)."""

    def __init__(
        self, overrides: Iterable[tuple[str, Iterable[tuple[str, float]]]] = (), *, batch: bool = False
    ) -> None:
        factor = BATCH_DISCOUNT if batch else 1.0
        self.batch = batch
        self.table = {
            m: {
                **{size: price * factor for size, price in info.price_usd.items()},
                INPUT_IMAGE: info.input_image_usd * factor,
            }
            for m, info in MODELS.items()
        }
        for model, sizes in overrides:
            self.table[model].update(dict(sizes))

    @classmethod
    def of(cls, spec: JobSpec) -> PriceTable:
        """The prices a spec's run pays: its `pricing` over the list prices, halved in batch mode."""
        return cls(spec.pricing, batch=spec.mode == "batch")

    def per_image(self, model: str, image_size: str | None) -> float:
        return self.table[model][effective_size(model, image_size)]

    def item(self, item: Item) -> float:
        """The price of one generated image of this item."""
        return self.per_image(item.model, item.config.image_size)

    def per_input_image(self, model: str) -> float:
        """What one reference image costs as input tokens (not billed as an image)."""
        return self.table[model][INPUT_IMAGE]


def usd(value: float) -> str:
    """Money for people, one rule everywhere: cents from a dollar up, a tenth of a cent below
    (rounded from the millionths, so a float sum and a stored total print alike); nothing is
    `$0.00`, and less than a tenth of a cent `<$0.001` (never a `$0.000` that is not nothing)."""
    value = money(value)
    if value == 0:
        return "$0.00"
    if 0 < value < 0.0005:
        return "<$0.001"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.3f}"


def money(value: float) -> float:
    """Money in JSON and manifests: to the millionth of a dollar, no float noise."""
    return round(value, 6)
