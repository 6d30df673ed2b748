"""The shape of `runner report --json`: the summary's TypedDicts, read by the text report, the gallery and the card."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class Latency(TypedDict):
    p50: float | None
    p95: float | None
    max: float | None


class ModelLine(TypedDict):
    model: str
    image_size: str
    ok: int
    failed: int
    cost_usd: NotRequired[float]


class OpenBatch(TypedDict):
    name: str | None  # batches/... (None: prepared by a run that stopped before the server answered)
    display_name: str
    state: str | None  # as last seen by a run
    items: int
    submitted_at: str
    stats: dict[str, Any]


class BatchesSummary(TypedDict):
    """Google Batch Mode: what the ledger (output/ledger.py) says is submitted and not yet collected."""

    open: list[OpenBatch]
    committed_usd: float  # what the open batches may still cost
    collected: int  # batches collected into the manifest
    abandoned: int  # batches that never ran or ended without results (their items went back)


class StepSummary(TypedDict):
    prompt_id: str
    parent: str | None  # the step it edits the images of (None: a first step)
    ok: int
    failed: int


class ChainsSummary(TypedDict):
    """Edit chains: counts per step, and edits made from a parent image that is no longer the parent's."""

    steps: list[StepSummary]
    failed_parents: int  # parents whose failure keeps their edits from being sent
    stale: list[str]  # item_ids of edits whose source image was made again since (their parent's image changed)


class ShardRow(TypedDict):
    shard: str  # K/N
    expected: int | None  # the items of this shard in the spec the dir last ran (spec.json)
    items: int  # items of this shard with a record
    ok: int
    failed: int
    cost_usd: float  # every line of its items (what was paid for them)
    last_activity: str | None  # its items' latest line
    running: bool | None  # a live lease (remote) or a held lock (local, this machine); None: cannot tell
    holder: str


class Shards(TypedDict):
    """The shards of the job's N (the latest sharded run's), one row per K: which array tasks to rerun."""

    count: int
    rows: list[ShardRow]
    running: int  # shards of this N running now
    others_running: list[str]  # runners of another N, or unsharded, running now


class Summary(TypedDict):
    """What `runner report --json` prints: `summarize`'s keys, then the quality's (runner.quality.analyze)
    and, with --html, the gallery's. Gallery, card and text all read this one shape."""

    output_dir: str
    name: str | None
    spec_items: int | None
    made_by_mock: bool
    items: int
    ok: int
    failed: int
    interrupted: int
    recovered: int
    failures_by_kind: dict[str, int]
    failure_examples: dict[str, list[str]]
    cost_usd: float
    latency_s: Latency
    percentiles: str
    requests: int
    retries: int
    retries_by_kind: dict[str, int]
    throughput_per_hour: float | None
    busy_s: float
    by_model: list[ModelLine]
    runs: int
    first_finished_at: str | None
    last_finished_at: str | None
    lines: int
    bad_lines: int
    vars: dict[str, dict[str, int]]
    inputs: dict[str, int]
    distinct_inputs: int
    # which records count: the items of the output dir's spec now (engine/current.py), or every one
    older_records: NotRequired[int]  # items with records that the spec no longer asks for, left out
    older_cost_usd: NotRequired[float]  # what their lines cost
    records_note: NotRequired[str]  # why every record counts (no spec, spec gone, --all-records)
    sources: NotRequired[list[dict[str, str]]]  # where the images came from: {base_url ("mock"), api_format}
    batches: BatchesSummary
    chains: NotRequired[ChainsSummary]
    generated_more_than_once: int  # items with two or more paid images (two runners of one shard, or a redo)
    shards: Shards | None
    # runner.quality.analyze
    duplicates: NotRequired[list[list[str]]]
    near_duplicates: NotRequired[list[list[str]] | None]
    near_duplicates_note: NotRequired[str]
    near_threshold: NotRequired[int]
    size_mismatches: NotRequired[list[str]]
    size_off: NotRequired[list[str]]
    pixel_sizes: NotRequired[list[dict[str, Any]]]
    uniform: NotRequired[list[str] | None]
    unreadable: NotRequired[list[str]]
    hashes: NotRequired[dict[str, Any] | None]
    unchanged_edits: NotRequired[list[str]]
    gallery: NotRequired[dict[str, Any]]
