"""A whole run: lock the output dir, resume from its manifest, run the pool, summarise."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from .client import Client, make_http_client
from .errors import RunnerError, UsageError
from .items import Item, Shard, iter_items, iter_keys
from .limits import Budget
from .manifest import ResumeState, scan
from .policy import Backoff
from .pool import Pool
from .pricing import PriceTable
from .progress import Bar
from .remote import open_output
from .spec import JobSpec, spec_summary
from .writer import OutputDir

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    out: str | Path | None = None  # a directory, or an fsspec URL such as s3://bucket/prefix
    base_url: str | None = None
    concurrency: int | None = None
    retry_failed: bool = False
    progress: bool = True
    mock: bool = False
    shard: Shard | None = None
    max_cost_usd: float | None = None
    verify: bool = False  # hash every done image instead of trusting size + mtime
    durable: bool = True
    grace_s: float = 30.0  # after Ctrl+C, how long in-flight requests may take before they are cancelled
    handle_signals: bool = False
    transport: httpx.AsyncBaseTransport | None = None
    api_key: str | None = field(
        default=None, repr=False
    )  # given directly (tests, embedding); otherwise read from spec.api_key_env


@dataclass
class RunResult:
    out_dir: str
    items: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0
    to_run: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0
    spent_usd: float = 0.0
    total_spent_usd: float = 0.0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None
    aborted: bool = False
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.aborted:
            return 3
        # 0 only when every item is ok: failures skipped from earlier runs count too.
        return 1 if self.failed or self.skipped_failed else 0


def run_job(spec: JobSpec, options: RunOptions = RunOptions(), log: Log = print) -> RunResult:
    """Run every item not yet done in the output dir (a rerun resumes), blocking until it ends."""
    return anyio.run(run_job_async, spec, options, log)


async def run_job_async(spec: JobSpec, options: RunOptions = RunOptions(), log: Log = print) -> RunResult:
    if options.mock:
        from .mock import MockConfig, MockGateway

        with MockGateway(MockConfig()) as gateway:
            return await _run(spec, options, log, gateway.base_url, "mock-key")
    key = (options.api_key or os.environ.get(spec.api_key_env) or "").strip()
    if not key:
        raise UsageError(
            f"no API key: set the environment variable {spec.api_key_env} (named by api_key_env in {spec.spec_path}), "
            "or try the job on the built-in mock gateway with --mock"
        )
    if not key.isprintable() or " " in key:
        # A key pasted with a stray newline or quote would fail every request, or not be sendable at all.
        raise UsageError(f"the API key in {spec.api_key_env} contains spaces or control characters")
    return await _run(spec, options, log, options.base_url or spec.base_url, key)


async def _run(spec: JobSpec, options: RunOptions, log: Log, base_url: str, key: str) -> RunResult:
    shard = options.shard
    out = open_output(options.out or spec.output_dir, shard.label if shard else None, options.durable)
    try:
        out.open()
        return await _run_locked(spec, options, log, base_url, key, out)
    finally:
        out.close()


async def _run_locked(
    spec: JobSpec, options: RunOptions, log: Log, base_url: str, key: str, out: OutputDir
) -> RunResult:
    result = RunResult(out.display)
    if out.repaired_bytes:
        log(
            f"repaired {out.manifest_path.name}: set aside a torn last line ({out.repaired_bytes} bytes) in {out.manifest_path.name}.torn"
        )
    state = await anyio.to_thread.run_sync(scan, out.path, options.verify, out.image_sizes)
    _plan(spec, options, state, result, out, log)
    result.total_spent_usd = state.spent_usd
    if result.to_run == 0:
        log(
            f"nothing to do: all {result.items} items are done in {out.display}"
            if not result.skipped_failed
            else "nothing to run: the rest failed permanently before (--retry-failed retries them)"
        )
        return result

    concurrency = options.concurrency or spec.concurrency
    rpm = options.shard.share(spec.requests_per_minute) if options.shard else spec.requests_per_minute
    max_cost = options.max_cost_usd if options.max_cost_usd is not None else spec.max_cost_usd
    if max_cost is not None and options.shard:
        # Shards cannot see each other's spending: each may spend its share of what is left.
        max_cost = state.spent_usd + options.shard.share(max(0.0, max_cost - state.spent_usd))
    http = make_http_client(base_url, key, spec.timeout_s, concurrency, options.transport)
    bar = Bar(result.to_run, options.progress)
    pool = Pool(
        Client(http, key, spec.timeout_s),
        out,
        PriceTable(spec.pricing),
        concurrency=concurrency,
        requests_per_minute=rpm,
        max_attempts=spec.max_attempts,
        budget=Budget(max_cost, state.spent_usd),
        breaker_limit=spec.max_consecutive_failures,
        progress=bar,
        backoff=Backoff(spec.backoff_base_s, spec.backoff_max_s),
        run_id=uuid.uuid4().hex[:12],
    )
    try:
        async with http, anyio.create_task_group() as tg:
            if options.handle_signals:
                tg.start_soon(_watch_signals, pool, options.grace_s, tg.cancel_scope, bar.write)
            await pool.run(_pending(spec, options, state))
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A run-wide fault raised inside a task (disk full) ends the run as itself, not as a group.
        raise _runner_error(group) or group from None
    finally:
        bar.close()
    stats = pool.stats
    result.ok, result.failed, result.retries, result.requests = stats.ok, stats.failed, stats.retries, stats.requests
    result.spent_usd = stats.spent_usd
    result.total_spent_usd = state.spent_usd + stats.spent_usd
    result.failures_by_kind = dict(stats.failures_by_kind)
    result.stop_reason = stats.stop_reason
    result.interrupted = stats.interrupted
    result.aborted = stats.abort and not stats.interrupted
    return result


def _plan(spec: JobSpec, options: RunOptions, state: ResumeState, result: RunResult, out: OutputDir, log: Log) -> None:
    """Count what is done, what will run, and what changed since the last run (spec drift)."""
    seen_known = 0
    for key in iter_keys(spec, options.shard):
        result.items += 1
        seen_known += state.known(key)
        if key in state.done:
            result.skipped_done += 1
        elif not state.pending(key, options.retry_failed):
            result.skipped_failed += 1
    result.to_run = result.items - result.skipped_done - result.skipped_failed
    previous = out.read_snapshot()
    summary = spec_summary(spec)
    if previous is not None and previous.get("fingerprint") != summary["fingerprint"]:
        added = result.items - seen_known
        gone = state.known_count(options.shard.owns if options.shard else None) - seen_known
        log(
            f"the spec changed since the last run in {out.display}: {added} new items, "
            f"{gone} recorded items are no longer in the spec (their records stay); going on with the new spec"
        )
    out.write_snapshot(summary)
    parts = [f"{result.items} items"]
    if result.skipped_done:
        parts.append(f"{result.skipped_done} already done (skipped)")
    if state.bad_images:
        parts.append(f"{len(state.bad_images)} recorded ok but image missing or corrupt (will redo)")
    if result.skipped_failed:
        parts.append(f"{result.skipped_failed} failed permanently before (skipped; --retry-failed retries them)")
    if state.retryable:
        parts.append(f"{len(state.retryable)} failed with a retryable error before (will retry)")
    if state.bad_lines:
        parts.append(f"{state.bad_lines} unreadable manifest lines ignored")
    parts.append(f"{result.to_run} to run")
    log(f"{spec.name}: " + "; ".join(parts))


def _runner_error(group: BaseExceptionGroup) -> RunnerError | None:
    for e in group.exceptions:
        found = _runner_error(e) if isinstance(e, BaseExceptionGroup) else e
        if isinstance(found, RunnerError):
            return found
    return None


def _pending(spec: JobSpec, options: RunOptions, state: ResumeState) -> Iterator[Item]:
    for item in iter_items(spec, options.shard):
        if state.pending(int(item.item_id, 16), options.retry_failed):
            yield item


async def _watch_signals(pool: Pool, grace_s: float, scope: anyio.CancelScope, write: Log) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            break
        write(
            f"interrupted: no new items start; waiting up to {grace_s:g}s for requests in flight (Ctrl+C again cancels them)"
        )
        pool.interrupt()
        with anyio.move_on_after(grace_s) as grace:
            async for _ in signals:
                break
        write(
            f"{'grace period over' if grace.cancelled_caught else 'second interrupt'}: cancelling the requests in flight"
        )
        pool.cancel_requests()  # what is already in hand is still saved and recorded
        async for _ in signals:
            write("third interrupt: stopping now")
            scope.cancel()
            return


def describe(result: RunResult) -> list[str]:
    """The closing summary a person reads."""
    lines = [
        f"{result.ok} ok, {result.failed} failed, {result.retries} retries, {result.requests} requests, "
        f"${result.spent_usd:.2f} spent this run (${result.total_spent_usd:.2f} in all) -> {result.out_dir}"
    ]
    if result.failures_by_kind:
        lines.append("failures: " + ", ".join(f"{k}={v}" for k, v in sorted(result.failures_by_kind.items())))
    if result.stop_reason:
        lines.append(f"stopped: {result.stop_reason}")
    if result.interrupted or result.aborted or result.failed:
        lines.append("rerun the same command to resume; done items are skipped and never paid for twice")
    return lines
