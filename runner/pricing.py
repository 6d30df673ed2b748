"""Prices per image, the cost of a record, and the dry-run estimate of a job."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .items import Item, Shard, iter_items
from .manifest import ResumeState, manifest_paths, scan
from .models import MODELS, effective_size
from .remote import is_remote, local_view
from .spec import JobSpec


class PriceTable:
    """The built-in list prices (runner/models.py, with their source) under the spec's overrides."""

    def __init__(self, overrides: Iterable[tuple[str, Iterable[tuple[str, float]]]] = ()) -> None:
        self.table = {m: dict(info.price_usd) for m, info in MODELS.items()}
        for model, sizes in overrides:
            self.table[model].update(dict(sizes))

    def per_image(self, model: str, image_size: str | None) -> float:
        return self.table[model][effective_size(model, image_size)]

    def item(self, item: Item) -> float:
        return self.per_image(item.model, item.config.image_size)


@dataclass
class Line:
    model: str
    size: str
    items: int = 0
    done: int = 0
    remaining: int = 0
    price_usd: float = 0.0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "image_size": self.size, "count": self.items, "done": self.done,
            "remaining": self.remaining, "price_usd": self.price_usd, "cost_usd": round(self.cost_usd, 6),
        }  # fmt: skip


def estimate(
    spec: JobSpec, out: str | Path | None = None, shard: Shard | None = None, concurrency: int | None = None
) -> dict[str, Any]:
    """Count, price and time the job without sending anything (no key needed)."""
    target = out or spec.output_dir
    if is_remote(target):
        with local_view(str(target)) as (local, sizes):
            state = scan(local, image_sizes=sizes)
    else:
        local = Path(target)
        state = scan(local) if local.is_dir() and manifest_paths(local) else ResumeState()
    prices = PriceTable(spec.pricing)
    lines: dict[tuple[str, str], Line] = {}
    permanent = 0
    for item in iter_items(spec, shard):
        size = effective_size(item.model, item.config.image_size)
        line = lines.get((item.model, size))
        if line is None:
            line = lines[(item.model, size)] = Line(item.model, size, price_usd=prices.item(item))
        line.items += 1
        key = int(item.item_id, 16)
        if key in state.done:
            line.done += 1
        else:
            line.remaining += 1
            line.cost_usd += line.price_usd
            permanent += not state.pending(key, retry_failed=False)
    conc = concurrency or spec.concurrency
    rpm = shard.share(spec.requests_per_minute) if shard else spec.requests_per_minute
    busy_s = sum(line.remaining * MODELS[line.model].latency_s for line in lines.values()) / conc
    remaining = sum(line.remaining for line in lines.values())
    time_s = max(busy_s, remaining * 60.0 / rpm) if rpm else busy_s
    cost = sum(line.cost_usd for line in lines.values())
    result: dict[str, Any] = {
        "name": spec.name,
        "output_dir": str(target),
        "items": sum(line.items for line in lines.values()),
        "done": sum(line.done for line in lines.values()),
        "remaining": remaining,
        "failed_permanently": permanent,
        "estimated_cost_usd": round(cost, 6),
        "spent_usd": round(state.spent_usd, 6),
        "estimated_time_s": round(time_s, 1),
        "time_basis": "requests_per_minute"
        if rpm and remaining * 60.0 / rpm >= busy_s
        else "concurrency x typical latency",
        "concurrency": conc,
        "requests_per_minute": rpm,
        "by_model": [line.as_dict() for line in sorted(lines.values(), key=lambda x: (x.model, x.size))],
        "max_cost_usd": spec.max_cost_usd,
        "warnings": [],
    }
    if permanent:
        result["warnings"].append(
            f"{permanent} of the remaining items failed permanently before: `runner run` skips them "
            "unless --retry-failed (they are counted and priced here)"
        )
    if spec.max_cost_usd is not None and state.spent_usd + cost > spec.max_cost_usd:
        result["warnings"].append(
            f"max_cost_usd is {spec.max_cost_usd:g}: spent ${state.spent_usd:.2f} + remaining ${cost:.2f} passes it; "
            "the run will stop when the budget is reached"
        )
    return result
