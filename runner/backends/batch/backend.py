"""The batch backend: items submitted to Google's Batch API as files of requests, waited for, collected into the manifest.

A rolling window of batches, each at most `max_requests` items of one model:

    prepare (ledger, fsynced) -> requests file -> upload -> create (ledger) -> poll ... -> download
    -> records committed -> collected (ledger) -> files deleted (ledger)

Every step that spends money is written down before it can be lost (output/ledger.py), so a
`kill -9` at any instant buys nothing twice: a batch prepared but not known to be created is
looked up on the server by its display name before anything is submitted again, and an item of
an open batch is never planned to send (ResumeState.in_batch). Failed lines are retried in new
batches up to `max_attempts` per item per run under the one policy table; a batch that ends
FAILED or EXPIRED returns its items to the to-do list.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from ...engine.feed import Feed
from ...engine.progress import duration, plural
from ...engine.session import SAVE_THREADS, Session
from ...engine.writer import Finished
from ...errors import RunnerError
from ...gateway.answer import Outcome, Success
from ...gateway.gemini import GeminiFormat
from ...output import Store
from ...output.ledger import BatchEntry
from ...policy import POLICY, Action, Failure
from ...pricing import PriceTable, usd
from ...record import Record
from ...safety import printable
from ...spec.inputs import Inputs
from ...spec.items import Item
from .api import WITH_RESULTS, ApiError, BatchInfo, GoogleBatchApi, Unknown
from .files import ResultsReader, write_requests

LOOKUP_CHUNK = 10_000  # items of finished batches looked up in one pass over the spec (bounds memory)
SUMMARY_EVERY_S = 60.0  # a line on all open batches while waiting, at most this often
REF_REUSE_S = 40 * 3600  # an uploaded reference image is used again for this long (the Files API keeps it 48 h)


@dataclass
class _Batch:
    """A batch this run is responsible for: its ledger entry (with its items' ids: an open batch
    holds no Items, so a 100,000-item job waits flat in memory; they are looked up to collect)."""

    entry: BatchEntry
    submitted: float = field(default_factory=time.monotonic)
    state: str = ""

    @property
    def ids(self) -> list[str]:
        return self.entry.items


class BatchBackend:
    """Implements backends.Backend with Google's Batch API."""

    def __init__(
        self,
        session: Session,
        store: Store,
        api: GoogleBatchApi,
        request_format: GeminiFormat,
        prices: PriceTable,
        inputs: Inputs,
        *,
        lookup: Callable[[set[str]], dict[str, Item]],
        job_name: str,
        api_key: str,
        base_url: str,
        key_env: str,
        max_requests: int,
        max_attempts: int,
        poll_s: float,
        wait: bool,
        run_id: str,
        work_dir: Path,
        unknown_grace_s: float = 30.0,
    ) -> None:
        self.session = session
        self.store = store
        self.api = api
        self.format = request_format
        self.prices = prices
        self.inputs = inputs
        self.lookup = lookup
        self.feed = Feed(iter(()))
        self.slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-")[:40] or "job"
        self.api_key = api_key
        self.base_url = base_url
        self.key_env = key_env
        self.max_requests = max_requests
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.wait = wait
        self.run_id = run_id
        self.work_dir = work_dir
        self.unknown_grace_s = unknown_grace_s
        self.stats = session.stats
        self.log = session.log
        self.open: dict[str, _Batch] = {}
        self.requeue: deque[Item] = deque()
        self.tries: Counter[str] = Counter()  # submissions of an item in this run, beyond its first
        self.retried: dict[str, Counter[str]] = {}
        self.refs: dict[str, str] = {}  # reference image sha256 -> its Files API uri
        self._changed = anyio.Event()  # a batch ended, or items came back: the submitter looks again
        self._said = -SUMMARY_EVERY_S
        self._saving = anyio.Semaphore(SAVE_THREADS)  # results lines being saved at once

    # -- Backend ------------------------------------------------------------------------------
    def interrupt(self) -> None:
        self.session.interrupt()
        self._wake()

    def cancel_requests(self) -> None:
        self.session.stop("interrupted", "interrupt")
        self._wake()

    async def run(self, feed: Feed, on_disk: dict[int, list[str]] | None = None) -> None:
        """Collect what earlier runs submitted, submit what is left, and (unless --no-wait) wait for it."""
        self.feed = feed
        self.session.on_stop.append(feed.stop)
        self.session.sink.open()
        try:
            ledger = self.store.ledger()
            now = time.time()
            self.refs = {
                sha: str(r.get("uri")) for sha, r in ledger.refs.items() if now - _epoch(r.get("at")) < REF_REUSE_S
            }
            await self._adopt(ledger.open_batches())
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._poll_loop, tg.cancel_scope)
                await self._submit()
                if self.wait:  # nothing is open or to do any more (or the run stops): the poller is done too
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.api.aclose()
            self.session.sink.shutdown()
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._say_open()

    # -- what earlier runs left -----------------------------------------------------------------
    async def _adopt(self, entries: list[BatchEntry]) -> None:
        """Take over the open batches of the ledger: find those whose create never said yes (a
        kill, a timeout) on the server by display name, and give up those it never got."""
        unnamed = [e for e in entries if e.name is None]
        found = await self._find([e.display_name for e in unnamed]) if unnamed else {}
        lost: list[BatchEntry] = []
        for entry in entries:
            if entry.name is None:
                names = found.get(entry.display_name, [])
                if not names:
                    lost.append(entry)
                    continue
                entry.name = names[0]
                self._event("created", entry.id, name=entry.name)
                await self._cancel_extras(entry, names[1:])
            self.open[entry.id] = _Batch(entry)
        if lost:
            items = await self._items({i for e in lost for i in e.items})
            for entry in lost:
                self._event("abandoned", entry.id, why="never created (not on the server)")
                self.log(f"batch {entry.display_name}: never created before the last run stopped; its "
                         f"{plural(len(entry.items), 'item')} go back to the to-do list")  # fmt: skip
                self.session.budget.settle(entry.reserved_usd, 0.0, 0)
                self.requeue.extend(items[i] for i in entry.items if i in items)  # never sent: not an attempt
                await self._delete_files(entry.file)

    async def _items(self, ids: set[str]) -> dict[str, Item]:
        """The Items of these ids: an edit chain's children planned in this run from the feed, the
        rest in one pass over the spec (in a thread); ids no longer in the spec are left out."""
        found = {i: self.feed.planned[i] for i in ids if i in self.feed.planned}
        rest = ids - found.keys()
        return {**found, **await anyio.to_thread.run_sync(self.lookup, rest)} if rest else found

    async def _find(self, display_names: list[str]) -> dict[str, list[str]]:
        """Display name -> the server's names of batches with it (oldest first), by paging through
        every batch (the Developer API's list has no filter)."""
        wanted = set(display_names)
        found: dict[str, list[tuple[str, str]]] = {}
        try:
            async for info in self.api.list():
                if info.display_name in wanted:
                    found.setdefault(info.display_name, []).append((info.created or "", info.name))
        except (Unknown, ApiError) as e:
            raise RunnerError(
                f"cannot list batches to find the ones an earlier run may have created: {_why(e)}; try again later"
            ) from None
        return {name: [n for _, n in sorted(pairs)] for name, pairs in found.items()}

    async def _cancel_extras(self, entry: BatchEntry, names: list[str]) -> None:
        """Two batches of one display name: a create that was sent twice. Keep the oldest, cancel the rest."""
        for name in names:
            self.log(
                f"batch {entry.display_name}: created twice ({name}); cancelling the second so nothing is paid twice"
            )
            try:
                await self.api.cancel(name)
            except (Unknown, ApiError) as e:
                self.log(f"could not cancel {name}: {_why(e)}; cancel it by hand (runner cancel cannot see it)")

    # -- submitting -----------------------------------------------------------------------------
    async def _submit(self) -> None:
        """Group items by model into batches of `max_requests` and submit each; then keep
        submitting what comes back (failed lines, failed batches) and an edit chain's children
        (planned as their parents are collected) until nothing is left."""
        buffers: dict[str, list[Item]] = {}
        while not self.session.is_stopping:
            item = self._next()
            if item is None:
                for model in list(buffers):
                    if buffers[model] and not await self._send(model, buffers.pop(model)):
                        return
                if not self.wait or (self.feed.exhausted and not self.open and not self.requeue):
                    return
                if not self.requeue and not self.feed.ready:  # nothing came back while the batches went
                    await self._changed.wait()
                continue
            group = buffers.setdefault(item.model, [])
            group.append(item)
            if len(group) >= self.max_requests and not await self._send(item.model, buffers.pop(item.model)):
                return

    def _next(self) -> Item | None:
        if self.requeue:
            return self.requeue.popleft()
        try:
            return self.feed.next()
        except RunnerError as e:  # a prompt or image file changed under a running job
            self.session.stop(f"the spec's files changed during the run: {e}", "abort", True)
            return None

    async def _send(self, model: str, items: list[Item]) -> bool:
        """Submit one batch; False when submitting must stop (budget, quota without waiting, a stop)."""
        cost = sum(self.prices.item(i) for i in items)
        reserved = self.session.budget.reserve(cost)
        if reserved is None:
            self.session.budget_reached()
            return False
        ids = sorted(i.item_id for i in items)
        local = secrets.token_hex(4)
        entry = BatchEntry(
            id=local, display_name=f"runner-{self.slug}-{hashlib.sha256(''.join(ids).encode()).hexdigest()[:10]}-{local}",
            model=model, model_id=self.format.model_id(model), items=[i.item_id for i in items], reserved_usd=reserved,
            prepared_at=_now(), base_url=self.base_url, key_env=self.key_env,
        )  # fmt: skip
        # Written (and fsynced) before anything leaves this machine: a kill from here on is found again.
        self.store.append_ledger({"event": "prepare", "id": entry.id, "display_name": entry.display_name,
                                  "model": model, "model_id": entry.model_id, "items": entry.items,
                                  "reserved_usd": reserved, "base_url": self.base_url, "key_env": self.key_env,
                                  "at": entry.prepared_at, "run_id": self.run_id})  # fmt: skip
        try:
            await self._upload_refs(items)
            path = self.work_dir / f"{entry.id}.requests.jsonl"
            await self.session.sink.save(write_requests, path, items, self.format, self.inputs, self.refs)
            try:
                uploaded = await self.api.upload(path, entry.display_name)
            finally:
                path.unlink(missing_ok=True)
            entry.file = str(uploaded["name"])
            self._event("uploaded", entry.id, file=entry.file)
            info = await self._create(entry)
        except (ApiError, Unknown) as e:
            self._give_back(entry, items, f"could not be submitted: {_why(e)}")
            if isinstance(e, ApiError) and e.failure.action is Action.ABORT:
                self.session.stop(
                    f"{e.failure.kind}: {e.failure.message} ({POLICY[e.failure.kind].what})",
                    "abort",
                    True,
                    failure=e.failure.kind,
                )
            elif isinstance(e, ApiError):
                self.session.stop(f"batch create refused: {e.failure.message}", "abort", True, failure=e.failure.kind)
            return False
        if info is None:  # quota, and no waiting: the rest is for the next run
            self._give_back(entry, items, "not submitted: the batch quota is full")
            return False
        entry.name = info.name
        self.open[entry.id] = _Batch(entry, state=info.state)
        self.log(
            f"submitted {plural(len(items), 'item')} in {entry.name} ({entry.display_name}); {usd(reserved)} committed"
        )
        return True

    async def _create(self, entry: BatchEntry) -> BatchInfo | None:
        """Create the batch: a 429 waits for an open batch to end (or gives up without waiting); an
        unknown outcome is resolved by listing, never by creating again blindly."""
        assert entry.file is not None
        while True:
            info: BatchInfo | None
            try:
                info = await self.api.create(entry.model_id, entry.display_name, entry.file)
            except ApiError as e:
                if e.failure.kind != "rate_limited":
                    raise
                if not self.wait:
                    return None
                self.log(
                    f"batch quota full (429): waiting for an open batch to end before submitting {entry.display_name}"
                )
                await self._wait_for_room(e.failure.retry_after)
                if self.session.is_stopping:
                    return None
                continue
            except Unknown as e:
                self.log(f"creating {entry.display_name}: {e}; looking for it on the server before trying again")
                info = await self._resolve(entry)
                if info is None:
                    continue
            self._event("created", entry.id, name=info.name)
            return info

    async def _resolve(self, entry: BatchEntry) -> BatchInfo | None:
        """After a create with no answer: the batch if the server has it; else None (create again),
        but only after a grace period in which a late create would have shown up."""
        for attempt in range(2):
            found = await self._find([entry.display_name])
            names = found.get(entry.display_name, [])
            if names:
                await self._cancel_extras(entry, names[1:])
                return await self.api.get(names[0])
            if attempt == 0:
                with anyio.move_on_after(self.unknown_grace_s):
                    await self.session.stopping.wait()
        return None

    async def _wait_for_room(self, server_wait: float | None) -> None:
        if self.open:
            with anyio.move_on_after(max(self.poll_s, server_wait or 0) * 10):
                await self._changed.wait()
        else:  # the quota is taken by batches that are not ours: try again later
            with anyio.move_on_after(max(self.poll_s, server_wait or 0)):
                await self.session.stopping.wait()

    def _give_back(self, entry: BatchEntry, items: list[Item], why: str) -> None:
        self._event("abandoned", entry.id, why=why)
        self.session.budget.settle(entry.reserved_usd, 0.0, 0)
        self.log(f"batch {entry.display_name}: {why}; its {len(items)} items stay to do")

    async def _upload_refs(self, items: list[Item]) -> None:
        """Reference images go to the Files API once each, and every request names them."""
        for item in items:
            for image in item.inputs:
                if image.sha256 is None or image.path is None or image.sha256 in self.refs:
                    continue
                data = await anyio.Path(image.path).read_bytes()
                if hashlib.sha256(data).hexdigest() != image.sha256:
                    raise RunnerError(f"{image.path} changed since the spec was checked; rerun to send the new one")
                file = await self.api.upload_bytes(data, f"runner-ref-{image.sha256[:16]}", image.mime or "image/png")
                self.refs[image.sha256] = str(file.get("uri") or file["name"])
                self.store.append_ledger({"event": "ref", "sha256": image.sha256, "file": file["name"],
                                          "uri": self.refs[image.sha256], "at": _now()})  # fmt: skip

    # -- waiting and collecting -----------------------------------------------------------------
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
        ended: list[tuple[_Batch, BatchInfo | None]] = []  # None: the server no longer knows it
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
                    ended.append((batch, None))
                    continue
                if e.failure.action is Action.ABORT:
                    self.session.stop(f"{e.failure.kind}: {e.failure.message}", "abort", True, failure=e.failure.kind)
                    return
                self.log(f"batch {batch.entry.name}: {e.failure.message}; trying again in {self.poll_s:g}s")
                continue
            if info.state != batch.state:  # said once per change, not once per poll
                batch.state = info.state
                self._event("state", batch.entry.id, state=info.state, stats=info.stats, results_file=info.results_file)
                self.log(self._status(batch, info))
            if info.done:
                ended.append((batch, info))
        # The ended batches' Items are looked up a chunk at a time: one pass over the spec per chunk.
        while ended and not self.session.is_stopping:
            chunk: list[tuple[_Batch, BatchInfo | None]] = []
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

    def _status(self, batch: _Batch, info: BatchInfo) -> str:
        s = info.stats
        counts = f"{s.get('successfulRequestCount', 0)} ok, {s.get('failedRequestCount', 0)} failed, {s.get('pendingRequestCount', 0)} pending"
        return f"batch {info.name}: {info.state} ({counts}) after {duration(time.monotonic() - batch.submitted)}"

    async def _finish(self, batch: _Batch, info: BatchInfo | None, items: dict[str, Item]) -> None:
        """A batch that ended (`info` None: the server no longer knows it): collected, or its items given back."""
        mine = [items[i] for i in batch.ids if i in items]
        if info is None:
            self.log(
                f"batch {batch.entry.name}: the server no longer knows it; its {plural(len(mine), 'item')} go back to the to-do list"
            )
            self.session.budget.settle(batch.entry.reserved_usd, 0.0, 0)
            await self._back(mine, Failure("server_error", 404, "its batch is gone from the server"))
            self._end(batch, "abandoned", why="the server no longer knows it (deleted, or another project's key)")
            return
        if info.state in WITH_RESULTS and info.results_file:
            await self._collect(batch, info, {i.item_id: i for i in mine})
            return
        state = info.state
        why = f"ended {state}" + (f": {info.error}" if info.error else "")
        self.session.budget.settle(batch.entry.reserved_usd, 0.0, 0)
        if state == "CANCELLED":  # someone cancelled it: stop spending on these; a later run submits them
            self.log(
                f"batch {info.name} was cancelled: its {plural(len(mine), 'item')} go back to the to-do list for a later run"
            )
        else:
            self.log(
                f"batch {info.name} ended {state}, not the items' fault: its {plural(len(mine), 'item')} go back to the to-do list"
            )
            kind = "timeout" if state == "EXPIRED" else "server_error"
            await self._back(mine, Failure(kind, None, f"its batch {info.name} {why}"))
        self._end(batch, "abandoned", why=why, state=state)

    async def _collect(self, batch: _Batch, info: BatchInfo, items: dict[str, Item]) -> None:
        """Download the results to disk as a stream, read them a line at a time, save and record
        every answer; then mark the batch collected and delete its files from the Files API."""
        assert info.results_file is not None
        path = self.work_dir / f"{batch.entry.id}.results.jsonl"
        try:
            await self.api.download(info.results_file, path)
        except (Unknown, ApiError) as e:
            self.log(f"batch {info.name}: download failed ({_why(e)}); trying again in {self.poll_s:g}s")
            path.unlink(missing_ok=True)
            return
        reader = ResultsReader(path, self.api_key)
        records: list[Record] = []
        finished: list[tuple[Item, Record]] = []
        seen: set[str] = set()
        retry: list[tuple[Item, Failure]] = []
        unknown = broken = 0
        latency = time.monotonic() - batch.submitted

        async def record(item: Item, outcome: Outcome) -> None:
            done = await self._record(item, outcome, info.name, latency)
            if done is not None:
                records.append(done)
                finished.append((item, done))
            else:
                assert isinstance(outcome, Failure)
                retry.append((item, outcome))

        try:
            # Lines are read one at a time; their images are saved by up to SAVE_THREADS tasks at once
            # (each holds one line's images), as the interactive pool saves answers side by side.
            async with anyio.create_task_group() as tg:
                while (line := await self.session.sink.save(reader.next)) is not None:
                    key, outcome = line
                    item = items.get(key or "")
                    if key is not None and key not in batch.entry.items:
                        unknown += 1
                        continue
                    if outcome is None or item is None or key in seen:
                        broken += outcome is None
                        continue  # a cut-off line is not done; a second line for a key is not paid twice
                    seen.add(item.item_id)
                    await self._saving.acquire()
                    tg.start_soon(self._released, record(item, outcome))
        finally:
            reader.close()
            path.unlink(missing_ok=True)
        missing = [item for i, item in items.items() if i not in seen]
        await self.session.sink.commit_now(records)  # in the manifest before the ledger says collected
        for item, rec in finished:
            self.feed.finished(item, rec)  # an ok parent's children are planned now
        spent = sum(r["cost_usd"] for r in records)
        images = max((1 + len(r.get("extra_images", [])) for r in records if r["status"] == "ok"), default=0)
        self.session.budget.settle(batch.entry.reserved_usd, spent, images)
        ok = sum(r["status"] == "ok" for r in records)
        self._event("collected", batch.entry.id, state=info.state, ok=ok, failed=len(records) - ok,
                    returned=len(retry) + len(missing))  # fmt: skip
        if missing or broken or unknown:
            self.log(f"batch {info.name}: {len(missing)} items had no whole line ({broken} cut off), "
                     f"{unknown} lines for keys it never held: the missing go back to the to-do list")  # fmt: skip
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
        retried = self.retried.setdefault(item.item_id, Counter())
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
        images = len(outcome.images) if isinstance(outcome, Success) else 0
        cost = self.prices.item(item) * images
        finished = Finished(item, outcome, tries, latency, latency, cost, retried, batch=batch_name)
        self.stats.requests += 1
        return await self.session.sink.save(self.session.writer.record, finished)

    async def _back(self, items: Iterable[Item], failure: Failure) -> None:
        """Items that are not done return to the to-do list: submitted again by this run while it
        waits and their attempts last; else recorded as failed with `failure` (retryable kinds: the
        next run submits them again)."""
        records = []
        for item in items:
            self.tries[item.item_id] += 1
            if self.wait and self.tries[item.item_id] < self.max_attempts and not self.session.is_stopping:
                self.retried.setdefault(item.item_id, Counter())[failure.kind] += 1
                self.stats.retries += 1
                self.stats.retries_by_kind[failure.kind] += 1
                self.requeue.append(item)
                continue
            finished = Finished(item, failure, self.tries[item.item_id], 0.0, 0.0, 0.0,
                                self.retried.get(item.item_id, Counter()))  # fmt: skip
            records.append(await self.session.sink.save(self.session.writer.record, finished))
            self.feed.finished(item, records[-1])
        if records:
            await self.session.sink.commit_now(records)
        self._wake()

    def _end(self, batch: _Batch, how: str, **fields: Any) -> None:
        self._event(how, batch.entry.id, **fields)
        self._close(batch)

    def _close(self, batch: _Batch) -> None:
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
                self.log(f"could not delete {name} from the Files API ({_why(e)}); it expires in 48 h")

    def _event(self, kind: str, batch_id: str, **fields: Any) -> None:
        self.store.append_ledger({"event": kind, "id": batch_id, **fields, "at": _now()})

    def _say_open(self) -> None:
        self.stats.open_batches = len(self.open)
        if self.open:
            names = ", ".join(b.entry.name or b.entry.display_name for b in list(self.open.values())[:3])
            more = f" and {len(self.open) - 3} more" if len(self.open) > 3 else ""
            self.log(
                printable(
                    f"{len(self.open)} batches stay open on the server ({names}{more}): a later run collects them"
                )
            )


def _why(e: Exception) -> str:
    return e.failure.message if isinstance(e, ApiError) else str(e)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _epoch(stamp: Any) -> float:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0
