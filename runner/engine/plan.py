"""One pass over a job's items against an output dir's resume state: what is done, what runs, what it costs."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..imageinfo import dimensions_of_file
from ..models import MODELS, effective_size, nearest_ratio
from ..output import MIME_TYPES, ResumeState, open_view
from ..pricing import PriceTable, money, usd
from ..spec.inputs import InputImage
from ..spec.items import Item, ItemFields, Memo, Shard, expected_children, iter_children, iter_keyed, parent_image
from ..spec.parse import JobSpec
from .progress import plural

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
    job_known: int = 0  # ...of every shard's (a chain's child is its root's shard's, not its own id's)
    input_images: int = 0  # reference images the remaining requests carry
    input_bytes: int = 0
    input_cost: float = 0.0
    lines: dict[tuple[str, str], Line] = field(default_factory=dict)
    input_shapes: Counter[str] = field(default_factory=Counter)  # items sending no aspect ratio: ratio they get
    ids_sum: int = 0  # the sum of the item ids (as ints): current.ids_digest tells when the set changed
    on_disk: int = 0  # items with image files on disk but no ok line (a kill between the two); set by the run
    job_items: int = 0  # the whole job's items (every shard's, expected children too): what `report` expects
    shard_items: list[int] = field(default_factory=list)  # with a shard: each shard's items (a chain's with its root)
    in_batch: int = 0  # items in batches still open (batch mode collects them; never sent again)
    expected: int = 0  # edit chains: children of parents not yet done, counted as if every parent succeeds
    blocked: int = 0  # ...of them, under parents that failed permanently (not sent unless --retry-failed)
    steps: dict[str, Line] = field(default_factory=dict)  # edit chains: per prompt (a step), its items and cost
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


BATCH_TURNAROUND_S = 24 * 3600.0


def make_plan(
    spec: JobSpec,
    state: ResumeState,
    prices: PriceTable,
    shard: Shard | None = None,
    retry_failed: bool = False,
) -> Plan:
    plan = Plan(shard_items=[0] * shard.count if shard else [])
    memo: Memo = {}
    parents = {p.link.parent for p in spec.prompts if p.link is not None}
    last_prompt, odd, long = "", False, False
    chained = {p.prompt_id for p in spec.prompts if p.link is not None}
    shapes: dict[str, tuple[int, int] | None] = {}
    # Every shard's items, to count the whole job (what `report` expects); only this shard's are planned.
    for key, fields, root in walk_known(spec, state):
        job = 1
        if fields.prompt_id in parents and key not in state.done:  # its children, as if it succeeds
            job += sum(expected_children(spec, fields.prompt_id, fields.vars, memo).values())
        plan.job_items += job
        plan.job_known += state.known(key)
        if shard is not None:
            plan.shard_items[root % shard.count] += job
            if not shard.owns(root):
                continue
        model, inputs = fields.model, fields.inputs
        if fields.config.aspect_ratio is None:
            plan.input_shapes[_kept_shape(model, inputs, shapes)] += 1
        line, step = _line(plan, spec, prices, fields.prompt_id, model, fields.config.image_size)
        for counted in (line, step):
            if counted is not None:
                counted.items += 1
        plan.items += 1
        if fields.prompt_id not in chained:  # the drift digest: the spec's own items (children follow their parents)
            plan.ids_sum += key
        plan.known_seen += state.known(key)
        if key in state.done:
            for counted in (line, step):
                if counted is not None:
                    counted.done += 1
            plan.done += 1
            continue
        if key in state.in_batch:
            plan.in_batch += 1
        for counted in (line, step):
            if counted is not None:
                counted.remaining += 1
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
        failed = key not in state.in_batch and not state.pending(key, retry_failed)
        if failed:
            plan.skipped_failed += 1
        if fields.prompt_id in parents:  # its children are not known yet: count them as if it succeeds
            for (prompt_id, child_model, size), n in expected_children(
                spec, fields.prompt_id, fields.vars, memo
            ).items():
                line, step = _line(plan, spec, prices, prompt_id, child_model, size)
                for counted in (line, step):
                    if counted is not None:
                        counted.items += n
                        counted.remaining += n
                plan.items += n
                plan.expected += n
                plan.blocked += n if failed else 0
    plan.to_run = plan.items - plan.done - plan.skipped_failed - plan.in_batch - plan.expected
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


def _line(
    plan: Plan, spec: JobSpec, prices: PriceTable, prompt_id: str, model: str, size_sent: str | None
) -> tuple[Line, Line | None]:
    """The model-and-size line of an item, and (an edit chain) its step's line."""
    size = effective_size(model, size_sent)
    line = plan.lines.get((model, size))
    if line is None:
        line = plan.lines[(model, size)] = Line(model, size, prices.per_image(model, size_sent))
    if not spec.chained:
        return line, None
    step = plan.steps.get(prompt_id)
    if step is None:
        step = plan.steps[prompt_id] = Line(prompt_id, size, 0.0)
    step.price_usd = max(step.price_usd, line.price_usd)  # a step's price: its dearest image
    return line, step


def iter_known(spec: JobSpec, state: ResumeState, shard: Shard | None) -> Iterator[tuple[int, ItemFields]]:
    """Every item whose id can be known now: the spec's items in order and, depth first after each
    done item, the children of an edit chain that its image gives (their ids come from it). A
    shard takes the roots whose ids it owns and all of their descendants."""
    for key, fields, _ in walk_known(spec, state, shard):
        yield key, fields


def walk_known(spec: JobSpec, state: ResumeState, shard: Shard | None = None) -> Iterator[tuple[int, ItemFields, int]]:
    """iter_known's items, each with the id of its root (the spec item its edit chain starts from:
    the one that decides its shard)."""
    if not spec.chained:
        for key, fields in iter_keyed(spec, shard):
            yield key, fields, key
        return
    parents = {p.link.parent for p in spec.prompts if p.link is not None}
    seen: set[int] = set()  # a child two identical parents give: once
    for root, root_fields in iter_keyed(spec, shard):
        stack: list[Iterator[tuple[int, ItemFields]]] = [iter(((root, root_fields),))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                continue
            key, fields = nxt
            yield key, fields, root
            image = state.images.get(key) if fields.prompt_id in parents and key in state.done else None
            if image is not None:
                sha, rel, size = image
                made = parent_image(fields.item_id, rel, sha, MIME_TYPES.get(rel.rsplit(".", 1)[-1], ""), size)
                stack.append(_unseen(iter_children(spec, Item(*fields), made), seen))


def _unseen(children: Iterator[ItemFields], seen: set[int]) -> Iterator[tuple[int, ItemFields]]:
    for fields in children:
        key = int(fields.item_id, 16)
        if key not in seen:
            seen.add(key)
            yield key, fields


def pending(spec: JobSpec, state: ResumeState, shard: Shard | None, retry_failed: bool) -> Iterator[Item]:
    """The items a run sends, in spec order (an edit chain's children of done parents after them)."""
    for key, fields in iter_known(spec, state, shard):
        if state.pending(key, retry_failed):
            yield Item(*fields)


def find_items(spec: JobSpec, shard: Shard | None, ids: set[str], state: ResumeState) -> dict[str, Item]:
    """The spec's Items with these ids, in one pass that stops once all are found; those recorded
    ok in `state` (a batch collected again after a kill must not record them twice) and those no
    longer in the spec are left out."""
    found: dict[str, Item] = {}
    wanted = {i for i in ids if int(i, 16) not in state.done}
    if wanted:
        for _, fields in iter_known(spec, state, shard):
            if fields.item_id in wanted:
                found[fields.item_id] = Item(*fields)
                if len(found) == len(wanted):
                    break
    return found


def rpm_share(spec: JobSpec, shard: Shard | None) -> float:
    """Each of N shards takes 1/N of the key's request rate."""
    return shard.share(spec.requests_per_minute) if shard else spec.requests_per_minute


def budget_share(max_cost: float | None, spent: float, shard: Shard | None) -> float | None:
    """Shards cannot see each other's spending: each may spend its share of what is left."""
    if max_cost is None or shard is None:
        return max_cost
    return spent + shard.share(max(0.0, max_cost - spent))


def _batch_rounds(spec: JobSpec, plan: Plan) -> int:
    """Batches one after another still to come: a chain step is submitted only once its parents are
    collected, so each depth of an edit chain with items left waits its own turnaround."""
    if not plan.remaining:
        return 0
    if not spec.chained:
        return 1
    parent = {p.prompt_id: p.link.parent for p in spec.prompts if p.link is not None}

    def depth(prompt_id: str) -> int:
        return 1 + depth(parent[prompt_id]) if prompt_id in parent else 0

    return len({depth(pid) for pid, step in plan.steps.items() if step.remaining}) or 1


def estimate(
    spec: JobSpec, out: str | Path | None = None, shard: Shard | None = None, concurrency: int | None = None
) -> dict[str, Any]:
    """Count, price and time the job without sending anything (no key needed)."""
    target = out or spec.output_dir
    with open_view(target) as view:
        state = view.scan(images=spec.chained)
        made_by_mock = bool(view.snapshot().get("made_by_mock"))
    plan = make_plan(spec, state, PriceTable.of(spec), shard)
    conc = concurrency or spec.concurrency
    rpm = rpm_share(spec, shard)
    busy_s = sum(line.remaining * MODELS[line.model].latency_s for line in plan.lines.values()) / conc
    time_s = max(busy_s, plan.remaining * 60.0 / rpm) if rpm else busy_s
    batch = spec.mode == "batch"
    rounds = _batch_rounds(spec, plan) if batch else 0
    if batch:  # Google's target turnaround, whatever the size: a day, a day more per chain step still to come
        busy_s = time_s = BATCH_TURNAROUND_S * rounds
        rpm = 0.0
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
        "time_basis": (
            f"batch turnaround: {rounds} chain steps one after another, each within 24 h"
            if rounds > 1
            else "batch turnaround: results within 24 h"
        )
        if batch
        else "requests_per_minute"
        if rpm and plan.remaining * 60.0 / rpm >= busy_s
        else "concurrency x typical latency",
        "assumed_latency_s": {m: MODELS[m].latency_s for m in sorted({line.model for line in plan.lines.values()})},
        "mode": spec.mode,
        "in_open_batches": plan.in_batch,
        "committed_usd": money(state.committed_usd),
        "concurrency": conc,
        "requests_per_minute": rpm,
        "by_model": [line.as_dict() for line in sorted(plan.lines.values(), key=lambda x: (x.model, x.size))],
        # items whose image config has no aspect_ratio: the ratio each gets (its first reference image's)
        "input_shapes": dict(plan.input_shapes.most_common()),
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
    if spec.chained:
        result["steps"] = [
            {"prompt_id": step.model, "count": step.items, "done": step.done, "remaining": step.remaining}
            for step in plan.steps.values()
        ]
        result["expected_children"] = plan.expected
        if plan.expected:
            result["warnings"].append(
                f"edit chains: {plural(plan.expected, 'item')} {'is an edit' if plan.expected == 1 else 'are edits'} of images not made yet, counted and priced as if "
                "every parent succeeds (their ids come from those images)"
                + (f"; {plan.blocked} of them are under parents that failed permanently" if plan.blocked else "")
            )
    if batch:
        result["warnings"].append(
            "batch mode: priced at Google's batch price (half the interactive list price unless `pricing` says "
            "otherwise); results take up to 24 h (a batch not done in 48 h expires and is resubmitted)"
        )
    if made_by_mock:
        result["warnings"].append(
            f"{target} holds images made by the built-in mock: `runner run` without --mock refuses it (use --out)"
        )
    return result
