"""The worker pool: bounded streams in, limited requests out, one writer task for the manifest."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt

from .client import Client, Outcome, Success
from .items import Item
from .limits import AdaptiveConcurrency, Budget, RateLimiter
from .policy import POLICY, Action, Backoff, CircuitBreaker, Failure
from .pricing import PriceTable
from .writer import OutputDir, image_relpath

_CANCELLED = Failure("connection", None, "cancelled before an answer came")  # a sentinel, never recorded


class Progress(Protocol):
    def record(self, rec: dict[str, Any], spent_usd: float) -> None: ...
    def retry(self) -> None: ...


@dataclass
class PoolStats:
    ok: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0
    spent_usd: float = 0.0
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    stop_reason: str | None = None  # why new items stopped starting (abort, budget, interrupt)
    abort: bool = False
    interrupted: bool = False


class Pool:
    def __init__(
        self,
        client: Client,
        out: OutputDir,
        prices: PriceTable,
        *,
        concurrency: int,
        requests_per_minute: float,
        max_attempts: int,
        budget: Budget,
        breaker_limit: int,
        progress: Progress | None = None,
        backoff: Backoff | None = None,
        run_id: str = "",
    ) -> None:
        self.client = client
        self.out = out
        self.prices = prices
        self.concurrency = AdaptiveConcurrency(concurrency)
        self.rate = RateLimiter(requests_per_minute)
        self.max_attempts = max_attempts
        self.budget = budget
        self.breaker = CircuitBreaker(breaker_limit)
        self.progress = progress
        self.backoff = backoff or Backoff()
        self.run_id = run_id
        self.stats = PoolStats()
        self.workers = concurrency
        self._stopping = anyio.Event()
        self._request_scopes: set[anyio.CancelScope] = set()
        self._requests_cancelled = False

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: str, abort: bool = False) -> None:
        """Start no new items; the ones in flight finish and are recorded."""
        if not self._stopping.is_set():
            self.stats.stop_reason, self.stats.abort = reason, abort
            self._stopping.set()

    def cancel_requests(self) -> None:
        """Give up on the requests in flight (a second Ctrl+C, the grace period over).

        Only the HTTP requests are cancelled: images already received are still saved and
        recorded, and the writer drains, so nothing that was paid for and is in hand is lost."""
        self._requests_cancelled = True
        self.stop("interrupted")
        for scope in list(self._request_scopes):
            scope.cancel()

    def interrupt(self) -> None:
        self.stats.interrupted = True
        self.stop("interrupted")

    async def run(self, items: Iterable[Item]) -> PoolStats:
        item_send, item_recv = anyio.create_memory_object_stream[Item](self.workers)
        rec_send, rec_recv = anyio.create_memory_object_stream[dict[str, Any]](self.workers * 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._feed, items, item_send)
            async with item_recv, rec_send:
                for _ in range(self.workers):
                    tg.start_soon(self._work, item_recv.clone(), rec_send.clone())
            tg.start_soon(self._write, rec_recv)
        return self.stats

    async def _feed(self, items: Iterable[Item], send: ObjectSendStream[Item]) -> None:
        async with send:
            for item in items:
                if self.stopping:
                    break
                await send.send(item)

    async def _work(self, recv: ObjectReceiveStream[Item], send: ObjectSendStream[dict[str, Any]]) -> None:
        async with recv, send:
            async for item in recv:
                if self.stopping:
                    continue
                estimate = self.prices.item(item)  # the price of one image
                if not self.budget.reserve(estimate):
                    self.stop(
                        f"budget reached: ${self.budget.spent:.2f} spent of max_cost_usd {self.budget.max_usd:g}", True
                    )
                    continue
                started = time.monotonic()
                outcome, attempts, latency = await self._attempts(item)
                if outcome is _CANCELLED:  # never answered: nothing to record, the next run sends it
                    self.budget.settle(estimate, 0.0)
                    continue
                self._judge(outcome)  # before anything else awaits: an abort stops new items at once
                record = await self._record(item, estimate, outcome, attempts, latency, time.monotonic() - started)
                self.budget.settle(estimate, record["cost_usd"])
                await send.send(record)

    async def _attempts(self, item: Item) -> tuple[Outcome, int, float]:
        attempts = 0
        latency = 0.0
        last: Outcome | None = None

        async def once() -> Outcome:
            nonlocal attempts, latency, last
            if last is not None:
                if self.stopping:  # stopped during the backoff: keep the failure we have
                    return last
                self._count_retry()
            if self._requests_cancelled:
                return last or _CANCELLED
            with anyio.CancelScope() as scope:
                self._request_scopes.add(scope)
                try:
                    async with self.concurrency.limiter:
                        await self.rate.acquire()
                        attempts += 1
                        self.stats.requests += 1
                        t0 = time.monotonic()
                        outcome = await self.client.generate(item)
                        latency = time.monotonic() - t0
                finally:
                    self._request_scopes.discard(scope)
            if scope.cancelled_caught:
                return last or _CANCELLED
            if isinstance(outcome, Failure) and outcome.kind == "rate_limited":
                self.concurrency.rate_limited()
                if outcome.retry_after is not None:
                    self.rate.pause(outcome.retry_after)
            elif isinstance(outcome, Success):
                self.concurrency.succeeded()
            last = outcome
            return outcome

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_result(self._should_retry),
            sleep=self._sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        outcome: Outcome = await retrying(once)
        return outcome, attempts, latency

    def _should_retry(self, outcome: Outcome) -> bool:
        # After a stop (Ctrl+C, abort), a retryable failure is recorded and left for the next run.
        return isinstance(outcome, Failure) and outcome.action is Action.RETRY and not self.stopping

    def _wait(self, state: RetryCallState) -> float:
        result = state.outcome.result() if state.outcome else None
        return self.backoff.wait(state.attempt_number, result if isinstance(result, Failure) else None)

    async def _sleep(self, seconds: float) -> None:
        """A backoff that a stop (Ctrl+C, abort, budget) cuts short."""
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    def _count_retry(self) -> None:
        self.stats.retries += 1
        if self.progress:
            self.progress.retry()

    def _judge(self, outcome: Outcome) -> None:
        if isinstance(outcome, Success):
            self.breaker.success()
            return
        if outcome.action is Action.ABORT:
            self.stop(f"{outcome.kind}: {outcome.message} ({POLICY[outcome.kind].what})", True)
        elif self.breaker.failure(outcome.kind):
            self.stop(
                f"circuit breaker: {self.breaker.count} items in a row failed with {outcome.kind} "
                f"(last: {outcome.message}); max_consecutive_failures is {self.breaker.limit}",
                True,
            )

    async def _record(
        self, item: Item, price: float, outcome: Outcome, attempts: int, latency: float, elapsed: float
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {
            **item.record_fields(),
            "status": "ok" if isinstance(outcome, Success) else "failed",
            "attempts": attempts,
            "request_id": outcome.request_id,
            "usage": outcome.usage if isinstance(outcome, Success) else None,
            "cost_usd": 0.0,
            "latency_s": round(latency, 3),
            "elapsed_s": round(elapsed, 3),
        }
        if isinstance(outcome, Success):
            saved = await anyio.to_thread.run_sync(self._save_images, item, outcome)
            first = saved[0]
            rec.update(first)
            if len(saved) > 1:
                rec["extra_images"] = saved[1:]
            if outcome.text:
                rec["text"] = outcome.text
            # Billed per image generated (list prices are per image; failures are not billed).
            rec["cost_usd"] = round(price * len(saved), 6)
        else:
            rec["error"] = outcome.as_record()
        rec["finished_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        rec["run_id"] = self.run_id
        return rec

    def _save_images(self, item: Item, outcome: Success) -> list[dict[str, Any]]:
        saved = []
        for i, image in enumerate(outcome.images):
            rel = image_relpath(item.item_id, image.mime, i)
            sha, mtime_ns = self.out.save_image(rel, image.data)
            saved.append(
                {"image_path": rel, "mime": image.mime, "bytes": len(image.data), "sha256": sha, "mtime_ns": mtime_ns}
            )
        return saved

    async def _write(self, recv: ObjectReceiveStream[dict[str, Any]]) -> None:
        async with recv:
            async for rec in recv:
                batch = [rec]
                while len(batch) < 256:  # group commit: whatever else is ready goes in the same fsync
                    try:
                        batch.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await anyio.to_thread.run_sync(self.out.append, batch)
                for r in batch:
                    self._count(r)

    def _count(self, rec: dict[str, Any]) -> None:
        if rec["status"] == "ok":
            self.stats.ok += 1
        else:
            self.stats.failed += 1
            self.stats.failures_by_kind[rec["error"]["kind"]] += 1
        self.stats.spent_usd += rec["cost_usd"]
        if self.progress:
            self.progress.record(rec, self.stats.spent_usd)
