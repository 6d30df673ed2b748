"""One pass over a job's items against an output dir's resume state: what is done, what runs, what it costs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import MODELS, effective_size
from ..output import ResumeState, open_view
from ..pricing import PriceTable, money, usd
from ..spec.items import Item, Shard, iter_items, iter_keyed
from ..spec.parse import JobSpec

LONG_PROMPT = 100_000  # characters: ~25,000 tokens, past what Nano Banana reads with room to spare
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tabs and line breaks are text


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
    odd_prompts: int = 0  # remaining items whose prompt holds a NUL byte or another control character
    long_prompts: int = 0  # remaining items whose prompt is past LONG_PROMPT characters
    longest: int = 0  # characters of the longest of those

    def warnings(self) -> list[str]:
        """What is about to be sent that nobody may have meant: said once per run, with the count."""
        said = []
        if self.odd_prompts:
            said.append(
                f"{self.odd_prompts} item(s) have a prompt with a NUL byte or another control character; "
                "they are sent as they are (a prompt file read with the wrong encoding?)"
            )
        if self.long_prompts:
            said.append(
                f"{self.long_prompts} item(s) have a prompt over {LONG_PROMPT:,} characters (the longest "
                f"{self.longest:,}): more than the models read (tens of thousands of tokens); the gateway may refuse "
                "or cut them"
            )
        return said

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
    last_prompt, odd, long = "", False, False
    for key, fields in iter_keyed(spec, shard):
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
        if fields.prompt is not last_prompt:  # items of one prompt share its text: looked at once
            last_prompt = fields.prompt
            odd = _CONTROL.search(last_prompt) is not None
            long = len(last_prompt) > LONG_PROMPT
        if odd:
            plan.odd_prompts += 1
        if long:
            plan.long_prompts += 1
            plan.longest = max(plan.longest, len(last_prompt))
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
        "warnings": list(spec.warnings) + plan.warnings(),
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
