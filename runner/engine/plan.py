"""One pass over a job's items against an output dir's resume state: what is done, what runs, what it costs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..imageinfo import dimensions_of_file
from ..models import MODELS, effective_size, nearest_ratio
from ..output import ResumeState, open_view
from ..pricing import PriceTable, money, usd
from ..spec.inputs import InputImage
from ..spec.items import Item, Shard, iter_items, iter_keyed
from ..spec.parse import JobSpec


@dataclass
class Line:
    model: str
    size: str
    price_usd: float
    items: int = 0
    done: int = 0
    remaining: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "image_size": self.size, "count": self.items, "done": self.done,
            "remaining": self.remaining, "price_usd": self.price_usd, "cost_usd": money(self.remaining * self.price_usd),
        }  # fmt: skip


@dataclass
class Plan:
    """The counts of one planning pass; the run and `runner estimate` both use it."""

    items: int = 0
    done: int = 0
    skipped_failed: int = 0  # failed permanently before and not retried (pending for estimate's cost)
    to_run: int = 0
    known_seen: int = 0  # items of the spec that have records
    input_images: int = 0  # reference images the remaining requests carry
    input_bytes: int = 0
    input_cost: float = 0.0
    lines: dict[tuple[str, str], Line] = field(default_factory=dict)
    input_shapes: Counter[str] = field(default_factory=Counter)  # items sending no aspect ratio: ratio they get
    ids_sum: int = 0  # the sum of the item ids (as ints): current.ids_digest tells when the set changed
    on_disk: int = 0  # items with image files on disk but no ok line (a kill between the two); set by the run

    @property
    def remaining(self) -> int:
        return self.items - self.done

    @property
    def cost(self) -> float:
        return sum(line.remaining * line.price_usd for line in self.lines.values())


def make_plan(
    spec: JobSpec,
    state: ResumeState,
    prices: PriceTable,
    shard: Shard | None = None,
    retry_failed: bool = False,
) -> Plan:
    plan = Plan()
    shapes: dict[str, tuple[int, int] | None] = {}
    for key, fields in iter_keyed(spec, shard):
        model, inputs = fields.model, fields.inputs
        if fields.config.aspect_ratio is None:
            plan.input_shapes[_kept_shape(model, inputs, shapes)] += 1
        size = effective_size(model, fields.config.image_size)
        line = plan.lines.get((model, size))
        if line is None:
            line = plan.lines[(model, size)] = Line(model, size, prices.per_image(model, fields.config.image_size))
        line.items += 1
        plan.items += 1
        plan.ids_sum += key
        plan.known_seen += state.known(key)
        if key in state.done:
            line.done += 1
            plan.done += 1
            continue
        line.remaining += 1
        plan.input_images += len(inputs)
        plan.input_bytes += sum(i.size for i in inputs)
        plan.input_cost += prices.per_input_image(model) * len(inputs)
        if not state.pending(key, retry_failed):
            plan.skipped_failed += 1
    plan.to_run = plan.items - plan.done - plan.skipped_failed
    return plan


def _kept_shape(model: str, inputs: tuple[InputImage, ...], shapes: dict[str, tuple[int, int] | None]) -> str:
    """The aspect ratio an item without one gets: its first reference image's (the nearest the model
    supports), 1:1 without reference images, "?" for a URL (the gateway fetches it: unknown here)."""
    if not inputs:
        return "1:1"
    first = inputs[0]
    if first.path is None or first.sha256 is None:
        return "?"
    if first.sha256 not in shapes:
        shapes[first.sha256] = dimensions_of_file(first.path)
    found = shapes[first.sha256]
    return nearest_ratio(model, *found) if found else "?"


def pending(spec: JobSpec, state: ResumeState, shard: Shard | None, retry_failed: bool) -> Iterator[Item]:
    """The items a run sends, in spec order."""
    for item in iter_items(spec, shard):
        if state.pending(int(item.item_id, 16), retry_failed):
            yield item


def rpm_share(spec: JobSpec, shard: Shard | None) -> float:
    """Each of N shards takes 1/N of the key's request rate."""
    return shard.share(spec.requests_per_minute) if shard else spec.requests_per_minute


def budget_share(max_cost: float | None, spent: float, shard: Shard | None) -> float | None:
    """Shards cannot see each other's spending: each may spend its share of what is left."""
    if max_cost is None or shard is None:
        return max_cost
    return spent + shard.share(max(0.0, max_cost - spent))


def estimate(
    spec: JobSpec, out: str | Path | None = None, shard: Shard | None = None, concurrency: int | None = None
) -> dict[str, Any]:
    """Count, price and time the job without sending anything (no key needed)."""
    target = out or spec.output_dir
    with open_view(target) as view:
        state = view.scan()
        made_by_mock = bool(view.snapshot().get("made_by_mock"))
    plan = make_plan(spec, state, PriceTable(spec.pricing), shard)
    conc = concurrency or spec.concurrency
    rpm = rpm_share(spec, shard)
    busy_s = sum(line.remaining * MODELS[line.model].latency_s for line in plan.lines.values()) / conc
    time_s = max(busy_s, plan.remaining * 60.0 / rpm) if rpm else busy_s
    cost = plan.cost
    result: dict[str, Any] = {
        "name": spec.name,
        "output_dir": str(target),
        "items": plan.items,
        "done": plan.done,
        "remaining": plan.remaining,
        "failed_permanently": plan.skipped_failed,
        "estimated_cost_usd": money(cost),
        "input_images": plan.input_images,
        "input_bytes": plan.input_bytes,
        "estimated_input_cost_usd": money(plan.input_cost),
        "spent_usd": money(state.spent_usd),
        "estimated_time_s": round(time_s, 1),
        "time_basis": "requests_per_minute"
        if rpm and plan.remaining * 60.0 / rpm >= busy_s
        else "concurrency x typical latency",
        "assumed_latency_s": {m: MODELS[m].latency_s for m in sorted({line.model for line in plan.lines.values()})},
        "concurrency": conc,
        "requests_per_minute": rpm,
        "by_model": [line.as_dict() for line in sorted(plan.lines.values(), key=lambda x: (x.model, x.size))],
        # items whose image config has no aspect_ratio: the ratio each gets (its first reference image's)
        "input_shapes": dict(plan.input_shapes.most_common()),
        "max_cost_usd": spec.max_cost_usd,
        "damaged_lines": state.bad_lines,
        "warnings": list(spec.warnings),
    }
    if plan.skipped_failed:
        result["warnings"].append(
            f"{plan.skipped_failed} of the remaining items failed permanently before: `runner run` skips them "
            "unless --retry-failed (they are counted and priced here)"
        )
    if spec.max_cost_usd is not None and state.spent_usd + cost > spec.max_cost_usd:
        result["warnings"].append(
            f"max_cost_usd is {spec.max_cost_usd:g}: spent {usd(state.spent_usd)} + remaining {usd(cost)} passes it; "
            "the run will stop when the budget is reached"
        )
    if state.bad_lines:
        result["warnings"].append(f"{state.bad_lines} damaged manifest lines ignored (a run sets them aside)")
    if made_by_mock:
        result["warnings"].append(
            f"{target} holds images made by the built-in mock: `runner run` without --mock refuses it (use --out)"
        )
    return result
