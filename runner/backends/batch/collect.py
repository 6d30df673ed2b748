"""Waiting for batches and collecting them: polling each open batch, downloading a finished
one's results as a stream, saving and recording every answer, giving back what is not done."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from ...engine.feed import Feed
from ...engine.progress import RunStats, duration, plural
from ...engine.session import Session
from ...engine.writer import Finished
from ...errors import OutputError
from ...gateway.answer import Outcome, Success
from ...output import Store
from ...output.files import output_error
from ...output.ledger import BatchEntry
from ...policy import POLICY, Action, Failure
from ...pricing import PriceTable, usd
from ...record import Record
from ...spec.items import Item
from .api import WITH_RESULTS, ApiError, BatchInfo, GoogleBatchApi, Unknown, error_text
from .files import ResultsReader

LOOKUP_CHUNK = 10_000  # items of finished batches looked up in one pass over the spec (bounds memory)
SUMMARY_EVERY_S = 60.0  # a line on all open batches while waiting, at most this often
GONE_AFTER = 3  # a results file refused this many times in a row (403/404) is gone (the Files API keeps 48 h)


@dataclass
class OpenBatch:
    """A batch this run is responsible for: its ledger entry (with its items' ids: an open batch
    holds no Items, so a 100,000-item job waits flat in memory; they are looked up to collect)."""

    entry: BatchEntry
    submitted: float = field(default_factory=time.monotonic)
    state: str = ""  # as this run last saw it ("": adopted from an earlier run, not yet looked at)
    cancelled_before: bool = False  # found cancelled (`runner cancel`) before this run first looked
    no_results_said: bool = False
    results_gone: int = 0  # downloads refused as not there (403/404) in a row

    @property
    def ids(self) -> list[str]:
        return self.entry.items


class Collecting:
    """BatchBackend's half that waits and collects (backend.py submits); the state is the backend's."""

    session: Session
    store: Store
    api: GoogleBatchApi
    prices: PriceTable
    feed: Feed
    lookup: Callable[[set[str]], dict[str, Item]]
    api_key: str
    poll_s: float
    wait: bool
    max_attempts: int
    collecting: bool  # a batch's results are being saved (a stop lets that finish)
    work_dir: Path
    stats: RunStats
    log: Callable[[str], None]
    open: dict[str, OpenBatch]
    requeue: deque[Item]
    tries: Counter[str]
    retried: dict[str, Counter[str]]
    _changed: anyio.Event
    _said: float
    _saving: anyio.Semaphore

    async def _items(self, ids: set[str]) -> dict[str, Item]:
        """The Items of these ids: an edit chain's children planned in this run from the feed, the
        rest in one pass over the spec (in a thread); ids no longer in the spec are left out."""
        found = {i: self.feed.planned[i] for i in ids if i in self.feed.planned}
        rest = ids - found.keys()
        return {**found, **await anyio.to_thread.run_sync(self.lookup, rest)} if rest else found

    async def _poll_loop(self, scope: anyio.CancelScope) -> None:
        """Every poll_s: look at each open batch, collect the finished ones (a timer, not a wait for
        an event: the server tells nothing by itself)."""
        while True:
            await self._poll_once()
            if not self.wait:
                return
            with anyio.move_on_after(self.poll_s):
                await self.session.stopping.wait()
            if self.session.is_stopping:
                scope.cancel()
                return

    async def _poll_once(self) -> None:
        ended: list[tuple[OpenBatch, BatchInfo | None]] = []  # None: the server no longer knows it
        unknown: list[OpenBatch] = []  # a get answered 404: gone only if the list says so too
        for batch in list(self.open.values()):
            if self.session.is_stopping:
                return
            assert batch.entry.name is not None
            try:
                info = await self.api.get(batch.entry.name)
            except Unknown as e:
                self.log(f"batch {batch.entry.name}: no answer ({e}); trying again in {self.poll_s:g}s")
                continue
            except ApiError as e:
                if e.failure.status == 404:
                    unknown.append(batch)
                    continue
                if e.failure.action is Action.ABORT:
                    self.session.stop(f"{e.failure.kind}: {e.failure.message}", "abort", True, failure=e.failure.kind)
                    return
                self.log(f"batch {batch.entry.name}: {e.failure.message}; trying again in {self.poll_s:g}s")
                continue
            if not batch.state and info.state == "CANCELLED":  # before this run first looked: see _finish
                batch.cancelled_before = True
            if info.state != batch.state:  # said once per change, not once per poll
                batch.state = info.state
                self._event("state", batch.entry.id, state=info.state, stats=info.stats, results_file=info.results_file)
                self.log(self._status(batch, info))
            if info.state in WITH_RESULTS and not info.results_file:
                # Paid for, and its results not named (yet): looked at again, never given up and bought twice.
                info.results_file = batch.entry.results_file
                if not info.results_file:
                    if not batch.no_results_said:
                        batch.no_results_said = True
                        self.log(f"batch {info.name}: {info.state} but no results file named; looking again "
                                 f"every {self.poll_s:g}s (it stays open)")  # fmt: skip
                    continue
            if info.done:
                ended.append((batch, info))
        if unknown and not await self._gone(unknown, ended):
            return
        # The ended batches' Items are looked up a chunk at a time: one pass over the spec per chunk.
        while ended and not self.session.is_stopping:
            chunk: list[tuple[OpenBatch, BatchInfo | None]] = []
            count = 0
            while ended and (not chunk or count + len(ended[0][0].ids) <= LOOKUP_CHUNK):
                chunk.append(ended.pop(0))
                count += len(chunk[-1][0].ids)
            items = await self._items({i for batch, _ in chunk for i in batch.ids})
            for batch, done in chunk:
                await self._finish(batch, done, items)
        now = time.monotonic()
        if self.open and now - self._said >= SUMMARY_EVERY_S:
            self._said = now
            states = Counter(b.state or "SUBMITTED" for b in self.open.values())
            self.log(f"batches: {len(self.open)} open ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); "
                     f"items done {self.stats.done}/{self.stats.total}; {usd(self.stats.spent_usd)} collected, "
                     f"{usd(self.session.budget.in_flight)} committed")  # fmt: skip

    async def _gone(self, unknown: list[OpenBatch], ended: list[tuple[OpenBatch, BatchInfo | None]]) -> bool:
        """Batches a get answered 404 for go to `ended` as gone only if the list of batches works and
        does not show them either: a flaky 404, or a wrong base URL (where the list is 404 too), must
        not give the items of a batch that runs on the server back to be bought again. False: stop."""
        try:
            listed = {info.name async for info in self.api.list()}
        except (Unknown, ApiError) as e:
            if isinstance(e, ApiError) and e.failure.action is Action.ABORT:
                self.session.stop(f"{e.failure.kind}: {e.failure.message} (batches not found: "
                                  f"{POLICY[e.failure.kind].what})", "abort", True, failure=e.failure.kind)  # fmt: skip
                return False
            self.log(f"{plural(len(unknown), 'batch', 'batches')} not found, and the list of batches failed ({error_text(e)}); "
                     f"trying again in {self.poll_s:g}s")  # fmt: skip
            return True
        for batch in unknown:
            if batch.entry.name in listed:
                self.log(f"batch {batch.entry.name}: not found, yet listed; trying again in {self.poll_s:g}s")
            else:
                ended.append((batch, None))
        return True

    def _status(self, batch: OpenBatch, info: BatchInfo) -> str:
        s = info.stats
        counts = f"{s.get('successfulRequestCount', 0)} ok, {s.get('failedRequestCount', 0)} failed, {s.get('pendingRequestCount', 0)} pending"
        return f"batch {info.name}: {info.state} ({counts}) after {duration(time.monotonic() - batch.submitted)}"

    async def _finish(self, batch: OpenBatch, info: BatchInfo | None, items: dict[str, Item]) -> None:
        """A batch that ended (`info` None: the server no longer knows it): collected, or its items given back."""
        mine = [items[i] for i in batch.ids if i in items]
        if info is None:
            self.log(
                f"batch {batch.entry.name}: the server no longer knows it; {plural(len(mine), 'item')} back to the to-do list"
            )
            self.session.budget.settle(batch.entry.reserved_usd, 0.0, 0)
            await self._back(mine, Failure("server_error", 404, "its batch is gone from the server"))
            self._end(batch, "abandoned", why="the server no longer knows it (deleted, or another project's key)")
            return
        if info.state in WITH_RESULTS and info.results_file:
            self.collecting = True
            try:
                await self._collect(batch, info, {i.item_id: i for i in mine})
            finally:
                self.collecting = False
            return
        state = info.state
        why = f"ended {state}" + (f": {info.error}" if info.error else "")
        self.session.budget.settle(batch.entry.reserved_usd, 0.0, 0)
        if state == "CANCELLED" and batch.cancelled_before:  # a run started after the cancel: it wants them done
            self.log(f"batch {info.name} was cancelled before this run: {plural(len(mine), 'item')} to submit again")
            self.requeue.extend(mine)  # not an attempt: the cancel was the user's
            self._wake()
        elif state == "CANCELLED":  # cancelled while this run waited: stop spending on these; a later run submits them
            self.log(
                f"batch {info.name} was cancelled: {plural(len(mine), 'item')} back to the to-do list for a later run"
            )
            for item in mine:  # left for a later run: an edit chain's parent among them adds no child now
                self.feed.finished(item, None)
        else:
            self.log(
                f"batch {info.name} ended {state}, not the items' fault: {plural(len(mine), 'item')} back to the to-do list"
            )
            kind = "timeout" if state == "EXPIRED" else "server_error"
            await self._back(mine, Failure(kind, None, f"its batch {info.name} {why}"))
        self._end(batch, "abandoned", why=why, state=state)

    async def _collect(self, batch: OpenBatch, info: BatchInfo, items: dict[str, Item]) -> None:
        """Download the results to disk as a stream, read them a line at a time, save and record
        every answer; then mark the batch collected and delete its files from the Files API."""
        assert info.results_file is not None
        path = self.work_dir / f"{batch.entry.id}.results.jsonl"
        try:
            # A line a key, each at most max_response_mb (twice: a key's line may come twice): more is no results file.
            cap = 2 * len(batch.ids) * self.api.max_line_bytes + (1 << 20)
            await self.api.download(info.results_file, path, max_bytes=cap)
        except (Unknown, ApiError) as e:
            path.unlink(missing_ok=True)
            too_big = isinstance(e, ApiError) and e.failure.kind == "invalid_response"
            gone = isinstance(e, ApiError) and e.failure.status in (403, 404)
            batch.results_gone = batch.results_gone + 1 if gone or too_big else 0
            if batch.results_gone >= GONE_AFTER:  # tried again for ever, a waiting run would never end
                why = f"its results file {info.results_file} " + ("cannot be read" if too_big else "is gone")
                why += f" ({error_text(e)})"
                self.log(f"batch {info.name}: {why}; {plural(len(items), 'item')} back to the to-do list")
                self.session.budget.settle(batch.entry.reserved_usd, 0.0, 0)
                await self._back(items.values(), Failure("server_error", None, f"the results of {info.name}: {why}"))
                self._end(batch, "abandoned", why=why, state=info.state)
                return
            self.log(f"batch {info.name}: download failed ({error_text(e)}); trying again in {self.poll_s:g}s")
            return
        except OSError as e:  # the output dir's disk (full): the results stay on the server for the next run
            path.unlink(missing_ok=True)
            self.session.output_failed(output_error(e, self.store.display))
            return
        reader = ResultsReader(path, self.api_key, self.api.max_line_bytes)
        records: list[Record] = []
        finished: list[tuple[Item, Record]] = []
        seen: set[str] = set()
        retry: list[tuple[Item, Failure]] = []
        unknown = broken = unsaved = 0
        latency = time.monotonic() - batch.submitted

        async def record(item: Item, outcome: Outcome) -> None:
            nonlocal unsaved
            try:
                done = await self._record(item, outcome, info.name, latency)
            except OutputError as e:  # the output dir cannot be written: counted; the results file is kept
                images = len(outcome.images) if isinstance(outcome, Success) else 0
                self.session.unsaved(e, self.prices.item(item) * images, images)
                unsaved += 1
                return
            if done is not None:
                records.append(done)
                finished.append((item, done))
            else:
                assert isinstance(outcome, Failure)
                retry.append((item, outcome))

        held = set(batch.entry.items)
        try:
            # Lines are read one at a time; their images are saved by up to SAVE_THREADS tasks at once
            # (each holds one line's images), as the interactive pool saves answers side by side.
            async with anyio.create_task_group() as tg:
                while (line := await self.session.sink.save(reader.next)) is not None:
                    key, outcome = line
                    item = items.get(key or "")
                    if key is not None and key not in held:
                        unknown += 1
                        continue
                    if outcome is None or item is None or key in seen:
                        broken += outcome is None
                        continue  # a cut-off line is not done; a second line for a key is not paid twice
                    seen.add(item.item_id)
                    await self._saving.acquire()
                    tg.start_soon(self._released, record(item, outcome))
        except BaseException:  # cut short (a second Ctrl+C, the grace over): what was saved is recorded
            with anyio.CancelScope(shield=True):  # (the batch stays open: the next run records the rest)
                await self.session.sink.commit_now(records)
            raise
        finally:
            reader.close()
            path.unlink(missing_ok=True)
        missing = [item for i, item in items.items() if i not in seen]
        await self.session.sink.commit_now(records)  # in the manifest before the ledger says collected
        if unsaved:  # not collected: the next run downloads the results again and saves what is missing
            self.log(
                f"batch {info.name}: {plural(unsaved, 'answer')} could not be saved; its results stay on the server"
            )
            return
        for item, rec in finished:
            self.feed.finished(item, rec)  # an ok parent's children are planned now
        spent = sum(r["cost_usd"] for r in records)
        images = max((1 + len(r.get("extra_images", [])) for r in records if r["status"] == "ok"), default=0)
        self.session.budget.settle(batch.entry.reserved_usd, spent, images)
        ok = sum(r["status"] == "ok" for r in records)
        self._event("collected", batch.entry.id, state=info.state, ok=ok, failed=len(records) - ok,
                    returned=len(retry) + len(missing))  # fmt: skip
        if missing:
            self.log(f"batch {info.name}: {plural(len(missing), 'item')} had no whole line"
                     + (f" ({broken} cut off)" if broken else "") + ": they go back to the to-do list")  # fmt: skip
        if unknown:
            self.log(f"batch {info.name}: {plural(unknown, 'line')} for keys it never held, left aside")
        await self._back(
            missing, Failure("invalid_response", None, f"no whole line for it in the results of {info.name}")
        )
        for item, failure in retry:
            await self._back([item], failure)
        await self._delete_files(batch.entry.file, info.results_file)
        self._event("cleaned", batch.entry.id)
        self._close(batch)  # last: the run may end once nothing is open, so this batch's work is finished first

    async def _released(self, work: Awaitable[None]) -> None:
        try:
            await work
        finally:
            self._saving.release()

    async def _record(self, item: Item, outcome: Outcome, batch_name: str, latency: float) -> Record | None:
        """The record of one answer, or None when it is to be tried again in a new batch."""
        tries = 1 + self.tries[item.item_id]
        if isinstance(outcome, Failure):
            if (
                outcome.action is Action.RETRY
                and self.wait
                and tries < self.max_attempts
                and not self.session.is_stopping
            ):
                return None  # _back puts it in a new batch
            if outcome.action is Action.ABORT:
                self.session.stop(
                    f"{outcome.kind}: {outcome.message} ({POLICY[outcome.kind].what})",
                    "abort",
                    True,
                    failure=outcome.kind,
                )
        # Done with this item: its counts go (a 100,000-item job keeps none of them past its line).
        self.tries.pop(item.item_id, None)
        retried = self.retried.pop(item.item_id, Counter())
        images = len(outcome.images) if isinstance(outcome, Success) else 0
        cost = self.prices.item(item) * images
        finished = Finished(item, outcome, tries, latency, latency, cost, retried, batch=batch_name)
        self.stats.requests += 1
        return await self.session.sink.save(self.session.writer.record, finished)

    async def _back(self, items: Iterable[Item], failure: Failure, sent: bool = True) -> None:
        """Items that are not done return to the to-do list: submitted again by this run while it
        waits and their attempts last; else recorded as failed with `failure` (retryable kinds: the
        next run submits them again). `sent=False`: never submitted (recorded now, no attempt counted)."""
        records = []
        for item in items:
            self.tries[item.item_id] += sent
            if sent and self.wait and self.tries[item.item_id] < self.max_attempts and not self.session.is_stopping:
                self.retried.setdefault(item.item_id, Counter())[failure.kind] += 1
                self.stats.retries += 1
                self.stats.retries_by_kind[failure.kind] += 1
                self.requeue.append(item)
                continue
            finished = Finished(item, failure, self.tries.pop(item.item_id, 0), 0.0, 0.0, 0.0,
                                self.retried.pop(item.item_id, Counter()))  # fmt: skip
            records.append(await self.session.sink.save(self.session.writer.record, finished))
            self.feed.finished(item, records[-1])
        if records:
            await self.session.sink.commit_now(records)
        self._wake()

    def _end(self, batch: OpenBatch, how: str, **fields: Any) -> None:
        self._event(how, batch.entry.id, **fields)
        self._close(batch)

    def _close(self, batch: OpenBatch) -> None:
        self.open.pop(batch.entry.id, None)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()  # the next wait waits for the next change

    async def _delete_files(self, *names: str | None) -> None:
        for name in names:
            if not name:
                continue
            try:
                await self.api.delete_file(name)
            except (Unknown, ApiError) as e:
                self.log(f"could not delete {name} from the Files API ({error_text(e)}); it expires in 48 h")

    def _event(self, kind: str, batch_id: str, **fields: Any) -> None:
        self.store.append_ledger({"event": kind, "id": batch_id, **fields, "at": stamp()})


def stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
