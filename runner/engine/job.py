"""A whole run: lock the output dir, resume from its manifest, hand what is left to a backend, summarise, notify."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx

from .. import fdlimit
from ..backends import Backend, make_backend
from ..errors import RunnerError, UsageError, write_details
from ..gateway.http import check_env
from ..output import ResumeState, Store, open_store
from ..pricing import PriceTable, usd
from ..spec.items import Shard
from ..spec.parse import JobSpec, spec_summary
from .budget import Budget
from .current import ids_digest
from .feed import Feed
from .notify import notify
from .plan import Plan, budget_share, find_items, make_plan, pending
from .progress import Bar, Quiet, RunStats, plural, status_line
from .session import Session
from .summary import describe, summary_dict
from .writer import Writer

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    out: str | Path | None = None  # a directory, or an fsspec URL such as s3://bucket/prefix
    base_url: str | None = None
    concurrency: int | None = None
    retry_failed: bool = False
    progress: bool = True  # a tqdm bar when stderr is a terminal; status lines otherwise
    status_every: float = 60.0  # seconds between status lines when there is no bar (0: none)
    mock: bool = False
    mock_config: Any = None  # a runner.mock MockConfig for --mock (latency, faults, rpm)
    shard: Shard | None = None
    max_cost_usd: float | None = None
    verify: bool = False  # hash every done image instead of trusting size + mtime
    durable: bool = True
    grace_s: float = 30.0  # after Ctrl+C, how long in-flight requests may take before they are cancelled
    handle_signals: bool = False
    notify_url: str | None = None  # POST the summary here when the run ends (overrides the spec's)
    on_finish: str | None = None  # run this shell command when the run ends (overrides the spec's)
    rerun_command: str | None = None  # how the summary tells a person to resume (the CLI passes its own)
    wait: bool = True  # batch mode: wait for the batches and collect them; False submits and returns (--no-wait)
    poll_s: float | None = None  # batch mode: seconds between status checks (default: the spec's batch.poll_s)
    transport: httpx.AsyncBaseTransport | None = None
    api_key: str | None = field(default=None, repr=False)  # given directly (tests, embedding); else from api_key_env


@dataclass
class RunResult:
    out_dir: str
    name: str = ""  # the job's
    key_env: str = "NANOBANANA_API_KEY"
    mock: bool = False  # made on the built-in mock: the hints say --mock
    batch: bool = False  # batch mode: unsaved answers stay on the server (a rerun downloads them again)
    base_url: str = ""  # where the requests went (`runner cancel` is told, unless it is Google's)
    items: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    to_run: int = 0
    spent_before_usd: float = 0.0
    max_cost_usd: float | None = None
    stats: RunStats = field(default_factory=RunStats)

    # The run's counts live in stats, once; these read them.
    ok = property(lambda self: self.stats.ok)
    failed = property(lambda self: self.stats.failed)
    retries = property(lambda self: self.stats.retries)
    requests = property(lambda self: self.stats.requests)
    spent_usd = property(lambda self: self.stats.spent_usd)
    failures_by_kind = property(lambda self: dict(self.stats.failures_by_kind))
    stop_reason = property(lambda self: self.stats.stop_reason)
    interrupted = property(lambda self: self.stats.signalled)
    aborted = property(lambda self: self.stats.abort and not self.stats.signalled)

    @property
    def total_spent_usd(self) -> float:
        """Everything the output dir's items cost: before this run, in it, and images adopted from disk."""
        return self.spent_before_usd + self.stats.spent_usd + self.stats.adopted_usd

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.aborted:
            return 3
        # 0 only when every item is ok: failures skipped from earlier runs count too.
        return 1 if self.stats.failed or self.stats.interrupted or self.skipped_failed else 0


def run_job(spec: JobSpec, options: RunOptions = RunOptions(), log: Log = print) -> RunResult:
    """Run every item not yet done in the output dir (a rerun resumes), blocking until it ends."""
    return anyio.run(run_job_async, spec, options, log)


async def run_job_async(spec: JobSpec, options: RunOptions = RunOptions(), log: Log = print) -> RunResult:
    """Run every item not yet done in the output dir; then notify (options' or the spec's
    notify_url and on_finish) with the summary. Raises only for a bad spec, a run-wide fault
    (RunAborted) or usage; failures of items are in the result and the manifest."""
    result = await _run_with_key(spec, options, log)
    url = options.notify_url or spec.notify_url
    command = options.on_finish or spec.on_finish
    if url or command:
        text = describe(result, options.rerun_command or "runner run JOB.yaml", absolute_path=True)[0]
        await notify(summary_dict(result), text, url=url, command=command, key_env=spec.api_key_env, log=log)
    return result


async def _run_with_key(spec: JobSpec, options: RunOptions, log: Log) -> RunResult:
    if options.mock:
        from ..mock import MockConfig, MockGateway

        # Real pixel sizes (image_scale 1): a rehearsal's report and gallery look like the real thing;
        # and the mock speaks the API format the job was written for, with the job's model ids.
        # Its batches and files live in the output dir, so a rerun after a kill finds them again.
        config = replace(
            options.mock_config or MockConfig(image_scale=1, batch_latency_s=MOCK_BATCH_S),
            flavor=spec.api_format,
            model_ids={**MockConfig().model_ids, **dict(spec.model_ids)},
            state_dir=_mock_state(options.out or spec.output_dir),
        )
        if spec.mode == "batch" and options.poll_s is None:
            options = replace(options, poll_s=min(spec.batch_poll_s, MOCK_POLL_S))  # the mock's clock is fast
        with MockGateway(config) as gateway:
            return await _run(spec, options, log, gateway.base_url, "mock-key")
    key = (options.api_key or os.environ.get(spec.api_key_env) or "").strip()
    if not key:
        raise UsageError(
            f"no API key: set the environment variable {spec.api_key_env} (api_key_env in {spec.spec_path} names the "
            "variable), or try the job on the built-in mock gateway with --mock"
        )
    if not key.isprintable() or " " in key:
        # A key pasted with a stray newline or quote would fail every request, or not be sendable at all.
        raise UsageError(f"the API key in {spec.api_key_env} contains spaces or control characters")
    base_url = options.base_url or spec.base_url
    check_env(base_url)  # a proxy or CA setting that cannot work: exit 2 now, not a failure of every item
    return await _run(spec, options, log, base_url, key)


MOCK_BATCH_S = 1.0  # a batch's life on the --mock clock
MOCK_POLL_S = 0.25


def _mock_state(out: str | Path) -> Path | None:
    """Where --mock keeps Google's files and batches between runs: beside the output (a remote one: nowhere)."""
    from ..output import is_remote

    return None if is_remote(out) else Path(out) / ".mock-google"


async def _run(spec: JobSpec, options: RunOptions, log: Log, base_url: str, key: str) -> RunResult:
    fdlimit.raise_limit()  # ulimit -n of 64 or 256 is far below what a concurrency of 200 needs
    shard = options.shard
    store = open_store(options.out or spec.output_dir, (shard.index, shard.count) if shard else None, options.durable)
    try:
        await anyio.to_thread.run_sync(store.open)
        result = await _run_open(spec, options, log, base_url, key, store)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(store.close)  # what the run was ending with is what it says
        raise
    with anyio.CancelScope(shield=True):
        # A remote store commits its last lines, merges the run's parts and releases its lease here.
        await anyio.to_thread.run_sync(store.close)
    return result


async def _run_open(spec: JobSpec, options: RunOptions, log: Log, base_url: str, key: str, store: Store) -> RunResult:
    result = RunResult(
        store.display, name=spec.name, key_env=spec.api_key_env, mock=options.mock, batch=spec.mode == "batch",
        base_url=base_url,
    )  # fmt: skip
    _say_repairs(store, log)
    previous = store.read_snapshot()  # what the dir remembers of its last run ({} if nothing)
    state = await anyio.to_thread.run_sync(store.scan, options.verify, spec.chained)
    mock_made = bool(previous.get("made_by_mock"))
    if mock_made != options.mock and state.known_count():  # never mix mock images and paid ones in one dir
        made, now = ("the built-in mock (--mock)", "a real") if mock_made else ("a gateway", "a --mock")
        raise UsageError(
            f"{store.display} holds images made by {made}: {now} run would mix its images in with them "
            "(and skip those items as done); give it another --out"
        )
    prices = PriceTable.of(spec)
    plan = await anyio.to_thread.run_sync(lambda: make_plan(spec, state, prices, options.shard, options.retry_failed))
    # Image files without records (a kill between an image and its line) matter only when there
    # is something to run; listing a million files to find none would slow every finished resume.
    # (Items in open batches count: a collection cut short leaves their images, and a results file
    # gone by the next run sends them again.)
    orphans = await anyio.to_thread.run_sync(store.orphans, state) if plan.to_run or plan.in_batch else {}
    # Another shard's images are its own business (and maybe being written now). An edit is its root's
    # shard's, which its own id does not tell: with chains every image is kept, and adopted only if
    # this shard plans its item.
    if options.shard is not None and not spec.chained:
        orphans = {k: paths for k, paths in orphans.items() if options.shard.owns(k)}
    plan.on_disk = len(orphans)
    result.items, result.skipped_done, result.skipped_failed = plan.items, plan.done, plan.skipped_failed
    result.to_run = plan.to_run
    result.spent_before_usd = state.spent_usd
    _drift(spec, options, state, plan, store, log, previous, base_url)
    max_cost = options.max_cost_usd if options.max_cost_usd is not None else spec.max_cost_usd
    parts = _plan_parts(plan, state)
    if max_cost is not None and options.shard is not None and plan.to_run:
        share = budget_share(max_cost, state.spent_usd, options.shard) or 0.0
        parts.append(
            f"budget per shard: this one may spend {usd(share - state.spent_usd)} (1/{options.shard.count} of the "
            f"{usd(max(0.0, max_cost - state.spent_usd))} left of max_cost_usd {max_cost:g}; shards cannot see "
            "each other's spending while they run)"
        )
    log(f"{spec.name}: " + "; ".join(parts))
    for warning in plan.warnings():
        log(f"warning: {warning}")
    # An open batch whose items are all recorded (a kill between its lines and its `collected` event) is
    # still to be closed: its commitment would stay in the report and the budget for ever.
    unclosed = spec.mode == "batch" and bool(state.in_batch)
    if plan.to_run == 0 and not plan.in_batch and not unclosed and plan.expected == plan.blocked:
        log(
            f"nothing to do: all {plan.items} items are done in {store.display}"
            if not plan.skipped_failed
            else "nothing to run: the rest failed permanently before (--retry-failed retries them)"
        )
        return result

    concurrency, said = fdlimit.fit(options.concurrency or spec.concurrency, 2 if options.mock else 1)
    if said:
        log(said)
    result.max_cost_usd = max_cost
    run_id = uuid.uuid4().hex[:12]
    bar_mode = options.progress and sys.stderr.isatty()
    shown: Bar | Quiet = Bar(plan.to_run) if bar_mode else Quiet(log)
    on_bug = lambda e, what: write_details(e, f"run {run_id}: {what}", key)  # noqa: E731
    session = Session(
        Writer(store, prices, run_id, on_bug),
        Budget(budget_share(max_cost, state.spent_usd, options.shard), state.spent_usd, state.committed_usd),
        log=shown.write,
        progress=shown if bar_mode else None,
        on_bug=on_bug,
    )
    backend = make_backend(
        spec, session, prices, store, base_url=base_url, api_key=key, concurrency=concurrency, shard=options.shard,
        transport=options.transport, lookup=lambda ids: find_items(spec, options.shard, ids, state), wait=options.wait,
        poll_s=options.poll_s, run_id=run_id,
    )  # fmt: skip
    session.stats.total = plan.to_run + plan.in_batch

    def planned(n: int) -> None:  # an edit chain's children, counted as they become known
        session.stats.total += n

    spec.inputs.reader = store.read_image  # an edit chain's children send their parents' images
    feed = Feed(
        pending(spec, state, options.shard, options.retry_failed), spec,
        lambda key: state.pending(key, options.retry_failed), planned,
    )  # fmt: skip
    result.stats = session.stats
    try:
        async with anyio.create_task_group() as tg:
            if options.handle_signals:
                tg.start_soon(_watch_signals, backend, options.grace_s, tg.cancel_scope, shown.write)
            if not bar_mode and options.status_every > 0:
                tg.start_soon(_status_lines, session.stats, options.status_every, shown.write)
            if store.upkeep_s > 0:
                tg.start_soon(_upkeep, store, session)
            await backend.run(feed, orphans)
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A run-wide fault raised inside a task (disk full) ends the run as itself, not as a group.
        raise _runner_error(group) or group from None
    finally:
        shown.close()
    return result


def _say_repairs(store: Store, log: Log) -> None:
    """What opening the output dir had to mend, said once."""
    name = store.manifest_name
    if store.repaired_bytes:
        log(f"repaired {name}: set aside a torn last line ({store.repaired_bytes} bytes) in {name}.torn")
    if store.damaged_lines:
        log(
            f"set aside {store.damaged_lines} damaged line(s) of {name} in {name}.torn; "
            "their items are recovered from their images, or run again"
        )
    if store.removed_temps:
        log(f"removed {store.removed_temps} temporary file(s) left by an earlier run that died")
    for warning in store.warnings:
        log(warning)


def _drift(
    spec: JobSpec,
    options: RunOptions,
    state: ResumeState,
    plan: Plan,
    store: Store,
    log: Log,
    previous: dict[str, Any],
    base_url: str,
) -> None:
    """Say how the spec changed since the output dir last ran it (spec drift), in the run that changed
    it: the set of item ids, not only the spec's text (a reference image's bytes, a prompt file's rows);
    remember this one, how many items it has (for `report`), whether mock images are in the dir, and
    where its images came from (for the dataset card)."""
    summary = spec_summary(spec)
    summary["made_by_mock"] = bool((options.mock and plan.to_run) or previous.get("made_by_mock"))
    summary["items"] = plan.job_items  # the whole job's, whichever shard ran: what `report` expects
    summary["sources"] = _sources(previous, "mock" if options.mock else base_url, spec.api_format, plan.to_run > 0)
    same = previous.get("fingerprint") == summary["fingerprint"]
    if options.shard is not None:
        summary["shards"], summary["shard_items"] = options.shard.count, plan.shard_items
    elif same and isinstance(previous.get("shards"), int):  # an unsharded run finishing a sharded job
        summary["shards"], summary["shard_items"] = previous["shards"], previous.get("shard_items")
    if options.shard is None:
        summary["items_digest"] = ids_digest(plan.ids_sum)
    elif isinstance(previous.get("items_digest"), str):
        summary["items_digest"] = previous["items_digest"]
    if options.shard is None and isinstance(previous.get("items_digest"), str):
        changed = previous["items_digest"] != summary["items_digest"]
    else:  # a shard sees only its items; an older spec.json has no digest
        changed = not same
    if previous and changed:
        added = plan.items - plan.expected - plan.known_seen  # expected children: not known yet
        gone = state.known_count() - plan.job_known  # the whole dir's: which shard an old child was is unknown
        if added or gone:
            log(
                f"the spec changed since the last run in {store.display}: {added} new items, "
                f"{gone} recorded items are no longer in the spec (their records stay; report and export leave "
                "them out); going on with the new spec"
            )
    store.write_snapshot(summary)


def _sources(previous: dict[str, Any], base_url: str, api_format: str, sends: bool) -> list[dict[str, str]]:
    """Where the dir's images came from, every run's that sends something (base_url "mock": the built-in mock)."""
    seen = [s for s in previous.get("sources") or [] if isinstance(s, dict)]
    here = {"base_url": base_url, "api_format": api_format}
    return (seen if here in seen or not sends else [*seen, here])[-20:]


def _plan_parts(plan: Plan, state: ResumeState) -> list[str]:
    parts = [plural(plan.items, "item")]
    if plan.done:
        parts.append(f"{plan.done} already done (skipped)")
    if plan.on_disk:
        parts.append(
            f"{plan.on_disk} with image files on disk but no record (recorded from them if whole, not bought again)"
        )
    if state.bad_images:
        parts.append(f"{len(state.bad_images)} recorded ok but image missing or corrupt (will redo)")
    if plan.skipped_failed:
        parts.append(f"{plan.skipped_failed} failed permanently before (skipped; --retry-failed retries them)")
    if state.retryable:
        parts.append(f"{len(state.retryable)} failed with a retryable error before (will retry)")
    if state.bad_lines:
        parts.append(f"{state.bad_lines} damaged manifest lines ignored")
    if plan.in_batch:
        parts.append(f"{plan.in_batch} in batches still open (to collect, never submitted again)")
    parts.append(f"{plan.to_run} to run")
    if plan.expected:
        parts.append(f"{plan.expected - plan.blocked} more as their parents' images are made (edit chains)")
    if plan.blocked:
        parts.append(f"{plan.blocked} waiting on parents that failed permanently (--retry-failed retries them)")
    return parts


def _runner_error(group: BaseExceptionGroup) -> RunnerError | None:
    for e in group.exceptions:
        found = _runner_error(e) if isinstance(e, BaseExceptionGroup) else e
        if isinstance(found, RunnerError):
            return found
    return None


async def _upkeep(store: Store, session: Session) -> None:
    """While the run lives, a remote store commits lines that waited long enough and renews its lease;
    a lease lost (this runner stalled past its expiry and another took over) stops the run."""
    while True:
        await anyio.sleep(store.upkeep_s)
        problem = await anyio.to_thread.run_sync(store.upkeep)
        if problem:
            session.log(problem)
            session.stop(problem, "abort", True)
            return


async def _status_lines(stats: RunStats, every: float, write: Log) -> None:
    """A status line every `every` seconds, for logs (a timer, not a wait for an event)."""
    while True:
        await anyio.sleep(every)
        write(status_line(stats))


async def _watch_signals(backend: Backend, grace_s: float, scope: anyio.CancelScope, write: Log) -> None:
    # SIGHUP is a closed terminal or ssh session: the same as Ctrl+C, drained, not dropped.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for _ in signals:
            break
        write(f"interrupted: no new items start; waiting up to {grace_s:g}s for {backend.in_flight}")
        backend.interrupt()
        with anyio.move_on_after(grace_s) as grace:
            async for _ in signals:
                break
        write(
            f"{'grace period over' if grace.cancelled_caught else 'second interrupt'}: cancelling the requests in flight"
        )
        backend.cancel_requests()  # what is already in hand is still saved and recorded
        async for _ in signals:
            write("third interrupt: stopping now")
            scope.cancel()
            return
