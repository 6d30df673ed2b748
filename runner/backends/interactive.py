"""The interactive backend: a pool of workers that take items, send limited and retried requests, and hand the answers to the run's sink."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
from anyio.abc import ObjectSendStream
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

from ..engine.feed import Feed
from ..engine.limits import MONOTONIC, AdaptiveConcurrency, Clock, RateLimiter
from ..engine.session import Session
from ..engine.writer import Finished
from ..errors import OutputError, RunnerError
from ..gateway.answer import Outcome, Success
from ..gateway.client import Client
from ..models import MODELS
from ..policy import POLICY, Action, CircuitBreaker, Failure, ServerWaitOrBackoff, StopWhen
from ..pricing import PriceTable
from ..record import Record
from ..spec.items import Item


@dataclass
class _ItemRun:
    """One item on its way through attempts."""

    item: Item
    price: float  # per image
    reserved: float  # of the budget, for its answer
    attempts: int = 0
    latency: float = 0.0
    last: Outcome | None = None
    retried: Counter[str] = field(default_factory=Counter)
    interrupted: bool = False
    replay: bool = False  # the next attempt is the one already made (the retrying starts after it)


class Pool:
    """`concurrency` workers over one Client; a rate limiter, AIMD concurrency, a circuit breaker
    and the run's budget are shared. Implements backends.Backend."""

    in_flight = "requests in flight (Ctrl+C again cancels them)"

    def __init__(
        self,
        session: Session,
        client: Client,
        prices: PriceTable,
        *,
        concurrency: int,
        requests_per_minute: float,
        max_attempts: int,
        breaker_limit: int,
        backoff: ServerWaitOrBackoff | None = None,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.session = session
        self.client = client
        self.prices = prices
        self.concurrency = AdaptiveConcurrency(concurrency, clock=clock)
        self.rate = RateLimiter(requests_per_minute, clock)
        self.max_attempts = max_attempts
        self.breaker = CircuitBreaker(breaker_limit)
        self.backoff = backoff or ServerWaitOrBackoff()
        self.workers = concurrency
        # The session's parts, bound once: the hot path reads them per item.
        self.stats = session.stats
        self.budget = session.budget
        self.writer = session.writer
        self.sink = session.sink
        self.log = session.log
        self.progress = session.progress
        self._stopping = session.stopping
        self._requests_cancelled = False
        self._feed = Feed(iter(()))
        self._first_answer = anyio.Lock()  # held by the one request in flight while the budget is learning
        self._model_said = False  # an answer from another model than asked was warned about
        self._on_disk: dict[int, list[str]] = {}

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def interrupt(self) -> None:
        self.session.interrupt()

    def cancel_requests(self) -> None:
        """Give up on the requests in flight (a second Ctrl+C, the grace period over).

        Only the HTTP requests are cancelled: images already received are still saved and
        recorded, and the sink drains, so nothing that was paid for and is in hand is lost."""
        self._requests_cancelled = True
        self.session.stop("interrupted", "interrupt")
        self.client.deadlines.cancel_all()

    async def run(self, feed: Feed, on_disk: dict[int, list[str]] | None = None) -> None:
        """Send every item of the feed. `on_disk`: image files named by item ids without an ok record
        (a kill between an image and its line leaves them); such an item's whole images are
        recorded (`recovered`), not bought again, when its turn comes."""
        self._on_disk = on_disk or {}
        self._feed = feed
        self.session.on_stop.append(feed.stop)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self.client.deadlines.run)
                async with anyio.create_task_group() as tg:
                    send = self.sink.start(tg, self.workers * 2)
                    async with send:
                        for _ in range(self.workers):
                            tg.start_soon(self._work, send.clone())
                outer.cancel_scope.cancel()  # the deadlines' clock
        finally:
            self.sink.shutdown()
            with anyio.CancelScope(shield=True):
                await self.client.http.aclose()

    def _next_item(self) -> Item | None:
        """The next item for a worker, or None when there is none now.

        Workers take items straight from the feed (the planner's iterator): the event loop runs
        one of them at a time, so no feeder task and stream are needed between (~13 us per item)."""
        if self.stats.stop_reason is not None:  # stopped, draining or not: no new item
            return None
        try:
            return self._feed.next()
        except RunnerError as e:  # a prompt or image file changed under a running job
            self.session.stop(f"the spec's files changed during the run: {e}", "abort", True)
            return None

    async def _next(self) -> Item | None:
        """The next item, waiting while an edit chain's parents in flight may still add children;
        None once there is nothing more (or the run stops)."""
        item = self._next_item()
        while item is None and not self._feed.exhausted and self.stats.stop_reason is None:
            await self._feed.wait()
            item = self._next_item()
        return item

    def _retrying(self) -> AsyncRetrying:
        """One tenacity controller per worker: attempts, backoff (the server's wait first), a
        stop (Ctrl+C, abort, budget) ends the retries, and the last outcome is returned as is."""
        return AsyncRetrying(
            # the run stops, or this item does (a retry that no longer fits the budget)
            stop=stop_after_attempt(self.max_attempts)
            | StopWhen(lambda state: self.stopping or state.args[0].interrupted),
            wait=self.backoff,
            retry=retry_if_result(_retryable),
            sleep=self._sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )

    async def _work(self, send: ObjectSendStream[Record]) -> None:
        retrying = self._retrying()
        async with send:
            while (item := await self._next()) is not None:
                record = None
                try:
                    record = await self._one(item, retrying)
                finally:
                    self._feed.finished(item, record)  # an ok parent's children are planned now
                if record is not None:
                    await send.send(record)

    async def _one(self, item: Item, retrying: AsyncRetrying) -> Record | None:
        """One item from start to record (None: nothing to record). A function of its own so
        that its answer and images are let go as it returns, not held through the next item."""
        price = self.prices.item(item)
        found = await self.session.adopt(item, self._on_disk)
        if found is not None:
            return found
        reserved = self.budget.reserve(price)
        if reserved is None:
            self.session.budget_reached()
            return None
        started = time.monotonic()
        run = _ItemRun(item, price, reserved)
        try:
            # The first attempt outside tenacity: most succeed, and a tenacity call costs ~20 us
            # of CPU per item (benchmarks/bench_hot_path.py). A retryable failure enters it as
            # attempt 1, replayed, so its waits and stops apply from there as before.
            outcome: Outcome | None = await self._attempt(run)
            if _retryable(outcome):
                run.replay = True
                outcome = await retrying(self._again, run)
        except (RunnerError, anyio.get_cancelled_exc_class()):
            raise
        except Exception as e:  # a bug: this item fails as `internal`, the run goes on
            where = self.session.on_bug(e, f"item {item.item_id}")
            outcome = Failure("internal", None, f"internal error: {type(e).__name__} (details in {where})")
        if outcome is None:  # never answered (requests cancelled): nothing to record, the next run sends it
            self.budget.settle(run.reserved, 0.0, 0)
            return None
        images = len(outcome.images) if isinstance(outcome, Success) else 0
        cost = price * images  # billed per image generated; failures are not billed
        self.budget.settle(run.reserved, cost, images)
        self._judge(outcome)  # before anything else awaits: an abort stops new items at once
        if isinstance(outcome, Success) and outcome.model not in (None, item.model) and not self._model_said:
            self._served(item, outcome.model)
        elapsed = time.monotonic() - started
        finished = Finished(item, outcome, run.attempts, run.latency, elapsed, cost, run.retried, run.interrupted)
        try:
            return await self.sink.save(self.writer.record, finished)
        except OutputError as e:  # the output dir cannot be written: the paid answer is counted, the run stops
            self.session.unsaved(e, cost, images)
            return None
        except RunnerError:
            raise
        except Exception as e:  # a bug while saving or recording: that item alone
            return self.writer.bug_record(item.record_fields(), e, run.attempts)

    async def _again(self, run: _ItemRun) -> Outcome | None:
        if run.replay:
            run.replay = False
            return run.last
        return await self._attempt(run)

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
        async with self.concurrency.limiter:
            # With a budget, the first answer goes alone: how many images an answer holds (each billed)
            # is known only then, and every request in flight on a guess could overshoot by that many.
            probing = self.budget.learning and await self._probe_turn()
            try:
                if not await self.rate.acquire(self._stopping) or (self.stopping and run.last is None):
                    # Stopped while waiting for a slot: nothing sent; a retry that never went is cut short.
                    run.interrupted = run.last is not None
                    return run.last
                reserved = self.budget.top_up(run.reserved, run.price)
                if reserved is None:  # answers now hold more images than when it reserved: it no longer fits
                    self.session.budget_reached()
                    run.interrupted = run.last is not None
                    return run.last
                run.reserved = reserved
                run.attempts += 1
                self.stats.requests += 1
                self.concurrency.sent()
                t0 = time.monotonic()
                outcome = await self.client.generate(run.item)
                run.latency = time.monotonic() - t0
                if probing and isinstance(outcome, Success):
                    self.budget.learned(len(outcome.images))
            finally:
                if probing:
                    self._first_answer.release()
        if outcome is None:  # given up (cancel_requests): no answer to record
            return run.last
        if isinstance(outcome, Failure) and outcome.kind == "rate_limited":
            if (said := self.concurrency.rate_limited()) is not None:
                self.log(said)
            if outcome.retry_after is not None and self.rate.pause(outcome.retry_after):
                self.log(f"the server asked to wait {outcome.retry_after:g}s: pausing every request until then")
        elif isinstance(outcome, Success) and (said := self.concurrency.succeeded()) is not None:
            self.log(said)
        run.last = outcome
        return outcome

    def _served(self, item: Item, served: str | None) -> None:
        """Say once when an answer names another model than the one asked (its name, or Google's for it)."""
        if served is None or same_model(item.model, served, getattr(self.client.format, "model_ids", None)):
            return
        self._model_said = True
        self.log(
            f"warning: the gateway answered {item.model} requests with model {served!r}; each line records the "
            "model that served it (served_model). Said once."
        )

    async def _probe_turn(self) -> bool:
        """Wait until no other request is in flight while the budget learns how many images an
        answer holds; True when this request is the probe (the caller releases the lock), False
        when an answer has taught it meanwhile (send as usual)."""
        await self._first_answer.acquire()
        if self.budget.learning:
            return True
        self._first_answer.release()
        return False

    async def _sleep(self, seconds: float) -> None:
        """A backoff that a stop (Ctrl+C, abort, budget) cuts short."""
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    def _judge(self, outcome: Outcome) -> None:
        if isinstance(outcome, Success):
            self.breaker.success()
            return
        if outcome.action is Action.ABORT and not outcome.final:
            reason = f"{outcome.kind}: {outcome.message} ({POLICY[outcome.kind].what})"
            self.session.stop(reason, "abort", True, failure=outcome.kind)
        elif self.breaker.failure(outcome.kind):
            self.session.stop(
                f"circuit breaker: {self.breaker.count} items in a row failed with {outcome.kind} "
                f"(last: {outcome.message}); max_consecutive_failures is {self.breaker.limit}",
                "breaker",
                True,
                failure=outcome.kind,
            )


def same_model(asked: str, served: str, model_ids: Mapping[str, str] | None = None) -> bool:
    """Is `served` (an answer's own model name) the model asked for? Runner's name, Google's for it (or
    the spec's model_ids), with or without a `models/`, `gemini/`, `google/` prefix or a version suffix."""
    names = {asked.lower()}
    if asked in MODELS:
        names.add(MODELS[asked].google_model.lower())
    if model_ids and asked in model_ids:
        names.add(model_ids[asked].lower())
    name = served.lower().rsplit("/", 1)[-1]
    return name in names or any(name.startswith(n + "-") for n in names)


def _retryable(outcome: Outcome | None) -> bool:
    return isinstance(outcome, Failure) and outcome.action is Action.RETRY
