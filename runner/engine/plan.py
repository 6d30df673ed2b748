"""One pass over a job's items against an output dir's resume state: what is done, what runs, what it costs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import MODELS, effective_size
from ..output import ResumeState, open_view
from ..pricing import PriceTable, money, usd
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
    on_disk: int = 0  # items with image files on disk but no ok line (a kill between the two); set by the run
    job_items: int = 0  # items of the whole spec (every shard's): what `report` expects
    shard_items: list[int] = field(default_factory=list)  # with a shard: the items of each shard K of N

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
    plan = Plan(shard_items=[0] * shard.count if shard else [])
    for key, fields in iter_keyed(spec):  # every item, to count the whole job; the shard's are planned
        plan.job_items += 1
        if shard is not None:
            plan.shard_items[key % shard.count] += 1
            if not shard.owns(key):
                continue
        model, inputs = fields.model, fields.inputs
        size = effective_size(model, fields.config.image_size)
        line = plan.lines.get((model, size))
        if line is None:
            line = plan.lines[(model, size)] = Line(model, size, prices.per_image(model, fields.config.image_size))
        line.items += 1
        plan.items += 1
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
        "concurrency": conc,
        "requests_per_minute": rpm,
        "by_model": [line.as_dict() for line in sorted(plan.lines.values(), key=lambda x: (x.model, x.size))],
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
