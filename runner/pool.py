"""The worker pool: bounded streams in, limited requests out; workers save each image durably, one writer task appends the lines."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

from .answer import Outcome, Success
from .client import Client
from .errors import RunnerError
from .imageinfo import dimensions, is_whole_image
from .items import Item
from .limits import AdaptiveConcurrency, Budget, RateLimiter
from .output import MIME_TYPES, Store, image_relpath
from .policy import POLICY, Action, CircuitBreaker, Failure, ServerWaitOrBackoff, StopWhen
from .pricing import PriceTable
from .progress import Progress, RunStats
from .record import ErrorRec, ImageFile, Record, encode, make_record

Log = Callable[[str], None]
OnBug = Callable[[BaseException, str], str]  # (exception, what was being done) -> where the details went


@dataclass
class _ItemRun:
    """One item on its way through attempts."""

    item: Item
    attempts: int = 0
    latency: float = 0.0
    last: Outcome | None = None
    retried: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False


@dataclass
class _Finished:
    item: Item
    outcome: Outcome
    attempts: int
    latency: float
    elapsed: float
    cost: float
    retried: Counter[str]
    interrupted: bool = False


class Pool:
    def __init__(
        self,
        client: Client,
        store: Store,
        prices: PriceTable,
        *,
        concurrency: int,
        requests_per_minute: float,
        max_attempts: int,
        budget: Budget,
        breaker_limit: int,
        backoff: ServerWaitOrBackoff | None = None,
        progress: Progress | None = None,
        run_id: str = "",
        log: Log = print,
        on_bug: OnBug | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.prices = prices
        self.concurrency = AdaptiveConcurrency(concurrency)
        self.rate = RateLimiter(requests_per_minute)
        self.max_attempts = max_attempts
        self.budget = budget
        self.breaker = CircuitBreaker(breaker_limit)
        self.backoff = backoff or ServerWaitOrBackoff()
        self.progress = progress
        self.run_id = run_id
        self.log = log
        self.on_bug = on_bug or (lambda e, what: "nowhere")
        self.stats = RunStats()
        self.workers = concurrency
        self._stopping = anyio.Event()
        self._request_scopes: set[anyio.CancelScope] = set()
        self._requests_cancelled = False
        self._stored_inputs: set[str] = set()
        self._inputs_lock = threading.Lock()
        # Images are saved by a few threads, not anyio's forty: a wave of 64 answers then does not
        # start 40 threads taking turns at the GIL (benchmarks/README.md, patch 07).
        self._savers = anyio.CapacityLimiter(SAVE_THREADS)
        self._on_disk: dict[int, list[str]] = {}

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: str, kind: str, abort: bool = False) -> None:
        """Start no new items; the ones in flight finish and are recorded."""
        if not self._stopping.is_set():
            self.stats.stop_reason, self.stats.stop_kind, self.stats.abort = reason, kind, abort
            self._stopping.set()

    def cancel_requests(self) -> None:
        """Give up on the requests in flight (a second Ctrl+C, the grace period over).

        Only the HTTP requests are cancelled: images already received are still saved and
        recorded, and the writer drains, so nothing that was paid for and is in hand is lost."""
        self._requests_cancelled = True
        self.stop("interrupted", "interrupt")
        for scope in list(self._request_scopes):
            scope.cancel()

    def interrupt(self) -> None:
        self.stats.signalled = True
        self.stop("interrupted", "interrupt")

    async def run(self, items: Iterable[Item], on_disk: dict[int, list[str]] | None = None) -> RunStats:
        """Send every item. `on_disk`: image files named by item ids without an ok record (a kill
        between an image and its line leaves them); such an item's whole images are recorded
        (`recovered`), not bought again, when its turn comes."""
        self._on_disk = on_disk or {}
        item_send, item_recv = anyio.create_memory_object_stream[Item](self.workers)
        done_send, done_recv = anyio.create_memory_object_stream[Record](self.workers * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write, done_recv)
            tg.start_soon(self._feed, items, item_send)
            async with item_recv, done_send:
                for _ in range(self.workers):
                    tg.start_soon(self._work, item_recv.clone(), done_send.clone())
        return self.stats

    async def _feed(self, items: Iterable[Item], send: ObjectSendStream[Item]) -> None:
        async with send:
            try:
                for item in items:
                    if self.stopping:
                        break
                    await send.send(item)
            except RunnerError as e:  # a prompt or image file changed under a running job
                self.stop(f"the spec's files changed during the run: {e}", "abort", True)

    def _retrying(self) -> AsyncRetrying:
        """One tenacity controller per worker: attempts, backoff (the server's wait first), a
        stop (Ctrl+C, abort, budget) ends the retries, and the last outcome is returned as is."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts) | StopWhen(lambda: self.stopping),
            wait=self.backoff,
            retry=retry_if_result(lambda o: isinstance(o, Failure) and o.action is Action.RETRY),
            sleep=self._sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )

    async def _work(self, recv: ObjectReceiveStream[Item], send: ObjectSendStream[Record]) -> None:
        retrying = self._retrying()
        async with recv, send:
            async for item in recv:
                if self.stopping:
                    continue
                price = self.prices.item(item)
                files = self._on_disk.pop(int(item.item_id, 16), None)
                if files is not None:
                    found = await anyio.to_thread.run_sync(self._recovered, item, files, limiter=self._savers)
                    if found is not None:
                        self.budget.settle(0.0, found["cost_usd"], 0)  # paid for before the crash
                        await send.send(found)
                        continue
                reserved = self.budget.reserve(price)
                if reserved is None:
                    spent = f"${self.budget.spent:.2f} spent of max_cost_usd {self.budget.max_usd:g}"
                    self.stop(f"budget reached: {spent}", "budget", True)
                    continue
                started = time.monotonic()
                run = _ItemRun(item)
                try:
                    outcome: Outcome | None = await retrying(self._attempt, run)
                except (RunnerError, anyio.get_cancelled_exc_class()):
                    raise
                except Exception as e:  # a bug: this item fails as `internal`, the run goes on
                    where = self.on_bug(e, f"item {item.item_id}")
                    outcome = Failure("internal", None, f"internal error: {type(e).__name__} (details in {where})")
                if outcome is None:  # never answered (requests cancelled): nothing to record, the next run sends it
                    self.budget.settle(reserved, 0.0, 1)
                    continue
                images = len(outcome.images) if isinstance(outcome, Success) else 0
                cost = price * images  # billed per image generated; failures are not billed
                self.budget.settle(reserved, cost, images)
                self._judge(outcome)  # before anything else awaits: an abort stops new items at once
                elapsed = time.monotonic() - started
                finished = _Finished(
                    item, outcome, run.attempts, run.latency, elapsed, cost, run.retried, run.interrupted
                )
                try:
                    record = await anyio.to_thread.run_sync(self._record, finished, limiter=self._savers)
                except RunnerError:
                    raise
                except Exception as e:  # a bug while saving or recording: that item alone
                    record = self._bug_record(item.record_fields(), e, run.attempts)
                await send.send(record)

    async def _attempt(self, run: _ItemRun) -> Outcome | None:
        if run.last is not None:
            if self.stopping:  # stopped during the backoff: keep the failure we have
                run.interrupted = True
                return run.last
            if isinstance(run.last, Failure):
                run.retried[run.last.kind] += 1
                self.stats.retries += 1
                self.stats.retries_by_kind[run.last.kind] += 1
                if self.progress:
                    self.progress.update(self.stats)
        if self._requests_cancelled:
            return run.last
        with anyio.CancelScope() as scope:
            self._request_scopes.add(scope)
            try:
                async with self.concurrency.limiter:
                    if not await self.rate.acquire(self._stopping) or (self.stopping and run.last is None):
                        # Stopped while waiting for a slot: nothing sent; a retry that never went is cut short.
                        run.interrupted = run.last is not None
                        return run.last
                    run.attempts += 1
                    self.stats.requests += 1
                    t0 = time.monotonic()
                    outcome = await self.client.generate(run.item)
                    run.latency = time.monotonic() - t0
            finally:
                self._request_scopes.discard(scope)
        if scope.cancelled_caught:
            return run.last
        if isinstance(outcome, Failure) and outcome.kind == "rate_limited":
            if (said := self.concurrency.rate_limited()) is not None:
                self.log(said + "; set requests_per_minute to stay under the limit")
            if outcome.retry_after is not None and self.rate.pause(outcome.retry_after):
                self.log(f"the server asked to wait {outcome.retry_after:g}s: pausing every request until then")
        elif isinstance(outcome, Success) and (said := self.concurrency.succeeded()) is not None:
            self.log(said)
        run.last = outcome
        return outcome

    async def _sleep(self, seconds: float) -> None:
        """A backoff that a stop (Ctrl+C, abort, budget) cuts short."""
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    def _judge(self, outcome: Outcome) -> None:
        if isinstance(outcome, Success):
            self.breaker.success()
            return
        if outcome.action is Action.ABORT and not outcome.final:
            self.stop(f"{outcome.kind}: {outcome.message} ({POLICY[outcome.kind].what})", "abort", True)
        elif self.breaker.failure(outcome.kind):
            self.stop(
                f"circuit breaker: {self.breaker.count} items in a row failed with {outcome.kind} "
                f"(last: {outcome.message}); max_consecutive_failures is {self.breaker.limit}",
                "breaker",
                True,
            )

    # -- the writer -------------------------------------------------------------------------
    async def _write(self, recv: MemoryObjectReceiveStream[Record]) -> None:
        async with recv:
            async for first in recv:
                batch = [first]
                while len(batch) < 256:  # group commit: whatever else is ready goes in the same fsync
                    try:
                        batch.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                records = await anyio.to_thread.run_sync(self._commit, batch)
                for rec in records:
                    self._count(rec)
                if self.progress:
                    self.progress.update(self.stats)

    def _commit(self, records: list[Record]) -> list[Record]:
        """Append a batch's lines in one write (their images are already durable). A record that
        cannot be encoded becomes an `internal` failure of its item alone, never the batch's."""
        lines = []
        for i, rec in enumerate(records):
            try:
                lines.append(encode(rec))
            except ValueError as e:  # a lone surrogate or NaN that slipped past: that record only
                fields = {k: rec.get(k) for k in _ITEM_FIELDS}
                records[i] = rec = self._bug_record(fields, e, rec.get("attempts", 0))
                lines.append(encode(rec))
        self.store.append(records, lines)
        return records

    def _record(self, f: _Finished) -> Record:
        """Save the item's images (each durable before this returns) and build its line; in a thread."""
        outcome = f.outcome
        images: list[ImageFile] = []
        error: ErrorRec | None = None
        if isinstance(outcome, Success):
            for i, image in enumerate(outcome.images):
                rel = image_relpath(f.item.item_id, image.mime, i)
                sha, mtime_ns = self.store.save_image(rel, image.data)
                size = dimensions(image.data, image.mime)
                images.append({"image_path": rel, "mime": image.mime, "bytes": len(image.data), "sha256": sha,
                               "mtime_ns": mtime_ns, "width": size[0] if size else None,
                               "height": size[1] if size else None})  # fmt: skip
            for ref in f.item.inputs:
                if ref.stored is not None and ref.path is not None:
                    with self._inputs_lock:  # saver threads share reference images: each is stored once
                        if ref.stored not in self._stored_inputs:
                            self.store.save_input(ref.stored, ref.path, ref.size)
                            self._stored_inputs.add(ref.stored)
        else:
            error = {"kind": outcome.kind, "status": outcome.status, "message": outcome.message}
        return make_record(
            f.item.record_fields(),
            status="ok" if images else "failed",
            attempts=f.attempts,
            request_id=outcome.request_id,
            usage=outcome.usage if isinstance(outcome, Success) else None,
            cost_usd=f.cost,
            latency_s=f.latency,
            elapsed_s=f.elapsed,
            finished_at=_now(),
            run_id=self.run_id,
            images=images,
            text=outcome.text if isinstance(outcome, Success) else "",
            error=error,
            retried=dict(f.retried),
            interrupted=f.interrupted,
        )

    def _bug_record(self, fields: dict[str, Any], e: Exception, attempts: int) -> Record:
        where = self.on_bug(e, f"recording item {fields.get('item_id')}")
        message = f"internal error: {type(e).__name__} (details in {where})"
        error: ErrorRec = {"kind": "internal", "status": None, "message": message}
        return make_record(
            fields, status="failed", attempts=attempts, request_id=None, usage=None, cost_usd=0.0,
            latency_s=0.0, elapsed_s=0.0, finished_at=_now(), run_id=self.run_id, error=error,
        )  # fmt: skip

    def _recovered(self, item: Item, paths: list[str]) -> Record | None:
        """The record of an item whose images were saved whole before a crash took its line, or
        None when its first image is not whole (then it is bought again). In a thread."""
        images: list[ImageFile] = []
        for rel in sorted(paths, key=lambda p: (len(p), p)):  # the first image, then -1, -2, ...
            mime = MIME_TYPES[rel.rsplit(".", 1)[-1]]
            data = self.store.read_image(rel)
            if data is None or not is_whole_image(mime, data):
                break
            size = dimensions(data, mime)
            images.append({"image_path": rel, "mime": mime, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "mtime_ns": None, "width": size[0] if size else None,
                           "height": size[1] if size else None})  # fmt: skip
        if not images or not images[0]["image_path"].rsplit(".", 1)[0].endswith(item.item_id):
            return None
        return make_record(
            item.record_fields(), status="ok", attempts=0, request_id=None, usage=None,
            cost_usd=self.prices.item(item) * len(images), latency_s=0.0, elapsed_s=0.0, finished_at=_now(),
            run_id=self.run_id, images=images, recovered=True,
        )  # fmt: skip

    def _count(self, rec: Record) -> None:
        s = self.stats
        if rec["status"] == "ok":
            s.ok += 1
            s.recovered += rec.get("recovered", False)
        elif rec.get("interrupted"):
            s.interrupted += 1
        else:
            s.failed += 1
            s.failures_by_kind[rec["error"]["kind"]] += 1
        s.spent_usd += rec["cost_usd"]


SAVE_THREADS = 8
_ITEM_FIELDS = ("item_id", "prompt_id", "prompt", "model", "image_config", "repeat", "vars")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
