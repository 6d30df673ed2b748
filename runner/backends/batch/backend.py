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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from ...engine.feed import Feed
from ...engine.progress import plural
from ...engine.session import SAVE_THREADS, Session
from ...errors import RunAborted, RunnerError
from ...gateway.gemini import GeminiFormat
from ...output import Store
from ...output.files import output_error
from ...output.ledger import LEDGER, BatchEntry, ledger_base
from ...policy import POLICY, Action, Failure
from ...pricing import PriceTable, usd
from ...safety import clean_message, printable
from ...spec.inputs import InputError, Inputs
from ...spec.items import Item
from .api import ApiError, BatchInfo, GoogleBatchApi, Unknown, error_text
from .collect import SUMMARY_EVERY_S, Collecting, OpenBatch, stamp
from .files import write_requests

# An uploaded reference image is named by new batches for this long: the Files API keeps it 48 h, and a
# batch named it then may take its 24 h (a batch past 48 h expires and is sent again, with a new upload).
REF_REUSE_S = 24 * 3600


class BatchBackend(Collecting):
    """Implements backends.Backend with Google's Batch API."""

    in_flight = "the batch being collected (Ctrl+C again stops it, keeping what it saved; open batches stay open)"

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
        self.on_disk: dict[int, list[str]] = {}
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
        self.open: dict[str, OpenBatch] = {}
        self.requeue: deque[Item] = deque()
        self.tries: Counter[str] = Counter()  # submissions of an item in this run, beyond its first
        self.retried: dict[str, Counter[str]] = {}
        self.refs: dict[str, str] = {}  # reference image sha256 -> its Files API uri
        self._changed = anyio.Event()  # a batch ended, or items came back: the submitter looks again
        self._said = -SUMMARY_EVERY_S
        self._saving = anyio.Semaphore(SAVE_THREADS)  # results lines being saved at once
        self._scope: anyio.CancelScope | None = None  # the submitter's and the poller's
        self.collecting = False

    # -- Backend ------------------------------------------------------------------------------
    def interrupt(self) -> None:
        self.session.interrupt()
        self._wake()

    def cancel_requests(self) -> None:
        self.session.stop("interrupted", "interrupt")
        if self._scope is not None:  # a collection under way stops now; what it recorded is committed
            self._scope.cancel()
        self._wake()

    async def run(self, feed: Feed, on_disk: dict[int, list[str]] | None = None) -> None:
        """Collect what earlier runs submitted, submit what is left, and (unless --no-wait) wait for it.
        `on_disk`: image files of items without an ok record (a kill between the two): recorded from
        them, not bought again."""
        self.feed = feed
        self.on_disk = on_disk or {}
        self.session.on_stop.append(feed.stop)
        self.session.sink.open()
        try:
            ledger = self.store.ledger()
            now = time.time()
            self.refs = {
                sha: str(r.get("uri")) for sha, r in ledger.refs.items() if now - _epoch(r.get("at")) < REF_REUSE_S
            }
            await self._adopt(self._mine(ledger.open_batches()))
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._poll_loop, tg.cancel_scope)
                await self._submit()
                # Nothing open or to do any more: the poller is done too. A stop (Ctrl+C) lets it
                # finish the batch it is collecting (it returns by itself; a second Ctrl+C cancels).
                if self.wait and not (self.session.is_stopping and self.collecting):
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.api.aclose()
            self.session.sink.shutdown()
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self._say_open()

    # -- what earlier runs left -----------------------------------------------------------------
    def _mine(self, entries: list[BatchEntry]) -> list[BatchEntry]:
        """The open batches this run collects: a shard's own (shards run at once, and two runs
        collecting one batch race to its results file); an unsharded run, which no shard runs
        beside, collects every shard's."""
        own = ledger_base(self.store.ledger_name)
        return entries if own == ledger_base(LEDGER) else [e for e in entries if e.source == own]

    async def _adopt(self, entries: list[BatchEntry]) -> None:
        """Take over the open batches of the ledger: find those whose create never said yes (a
        kill, a timeout) on the server by display name, and give up those it never got."""
        unnamed = [e for e in entries if e.name is None]
        found = await self._find([e.display_name for e in unnamed]) if unnamed else {}
        # A create sent just before a kill may land after this list (a restart within seconds): as
        # after a create with no answer in a run, wait out the grace from its upload, then list again.
        now = time.time()
        waits = [self.unknown_grace_s - (now - _epoch(e.uploaded_at)) for e in unnamed
                 if e.file is not None and e.display_name not in found]  # fmt: skip
        if max(waits, default=0.0) > 0:
            self.log(f"batches created just before the last run stopped may not be listed yet: looking again "
                     f"in {max(waits):.0f}s")  # fmt: skip
            with anyio.move_on_after(min(max(waits), self.unknown_grace_s)):
                await self.session.stopping.wait()
            found.update(await self._find([e.display_name for e in unnamed if e.display_name not in found]))
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
            self.open[entry.id] = OpenBatch(entry)
        if lost:
            items = await self._items({i for e in lost for i in e.items})
            for entry in lost:
                self._event("abandoned", entry.id, why="never created (not on the server)")
                self.log(f"batch {entry.display_name}: never created before the last run stopped: "
                         f"{plural(len(entry.items), 'item')} back to the to-do list")  # fmt: skip
                self.session.budget.settle(entry.reserved_usd, 0.0, 0)
                self.requeue.extend(items[i] for i in entry.items if i in items)  # never sent: not an attempt
                await self._delete_files(entry.file)

    async def _find(self, display_names: list[str]) -> dict[str, list[str]]:
        """Display name -> the server's names of batches with it (oldest first), by paging through
        every batch (the Developer API's list has no filter). A batch on two pages (the pages shift
        as batches are created meanwhile) is one batch, not a second create to cancel."""
        wanted = set(display_names)
        found: dict[str, dict[str, str]] = {}
        try:
            async for info in self.api.list():
                if info.display_name in wanted:
                    found.setdefault(info.display_name, {})[info.name] = info.created or ""
        except (Unknown, ApiError) as e:
            raise RunAborted(
                f"cannot list batches to find the ones an earlier run may have created: {error_text(e)}; try again later"
            ) from None
        return {name: sorted(names, key=lambda n: (names[n], n)) for name, names in found.items()}

    async def _cancel_extras(self, entry: BatchEntry, names: list[str]) -> None:
        """Two batches of one display name: a create that was sent twice. Keep the oldest, cancel the rest."""
        for name in names:
            self.log(
                f"batch {entry.display_name}: created twice ({name}); cancelling the second so nothing is paid twice"
            )
            try:
                await self.api.cancel(name)
            except (Unknown, ApiError) as e:
                self.log(f"could not cancel {name}: {error_text(e)}; cancel it by hand (runner cancel cannot see it)")

    # -- submitting -----------------------------------------------------------------------------
    async def _submit(self) -> None:
        """Group items by model into batches of `max_requests` and submit each; then keep
        submitting what comes back (failed lines, failed batches) and an edit chain's children
        (planned as their parents are collected) until nothing is left."""
        buffers: dict[str, list[Item]] = {}
        while not self.session.is_stopping:
            item = self._next()
            if item is not None and await self._adopted(item):
                continue
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

    async def _adopted(self, item: Item) -> bool:
        """An item whose whole image an earlier run saved but did not record: recorded from it."""
        found = await self.session.adopt(item, self.on_disk)
        if found is None:
            return False
        await self.session.sink.commit_now([found])
        self.feed.finished(item, found)
        return True

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
        try:
            items = await self._upload_refs(items)
        except (ApiError, Unknown) as e:  # as an input file that cannot be uploaded: the run stops, said (exit 3)
            self.log(f"could not upload reference images ({error_text(e)}): {plural(len(items), 'item')} left to do")
            kind = e.failure.kind if isinstance(e, ApiError) else "server_error"
            self.session.stop(f"could not upload reference images: {error_text(e)}", "abort", True, failure=kind)
            return False
        if not items:
            return True
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
            prepared_at=stamp(), base_url=self.base_url, key_env=self.key_env,
        )  # fmt: skip
        # Written (and fsynced) before anything leaves this machine: a kill from here on is found again.
        self.store.append_ledger({"event": "prepare", "id": entry.id, "display_name": entry.display_name,
                                  "model": model, "model_id": entry.model_id, "items": entry.items,
                                  "reserved_usd": reserved, "base_url": self.base_url, "key_env": self.key_env,
                                  "at": entry.prepared_at, "run_id": self.run_id})  # fmt: skip
        try:
            path = self.work_dir / f"{entry.id}.requests.jsonl"
            try:
                await self.session.sink.save(write_requests, path, items, self.format, self.inputs, self.refs)
            except OSError as e:  # the output dir's disk (full): nothing was sent
                path.unlink(missing_ok=True)
                self._give_back(entry, items, "its requests file could not be written")
                self.session.output_failed(output_error(e, self.store.display))
                return False
            try:
                uploaded = await self.api.upload(path, entry.display_name)
            finally:
                path.unlink(missing_ok=True)
            entry.file = str(uploaded["name"])
            self._event("uploaded", entry.id, file=entry.file)
            info = await self._create(entry)
        except (ApiError, Unknown) as e:
            self._give_back(entry, items, f"could not be submitted: {error_text(e)}")
            if isinstance(e, ApiError) and e.failure.action is Action.ABORT:
                self.session.stop(
                    f"{e.failure.kind}: {e.failure.message} ({POLICY[e.failure.kind].what})",
                    "abort",
                    True,
                    failure=e.failure.kind,
                )
            elif isinstance(e, ApiError):
                self.session.stop(f"batch create refused: {e.failure.message}", "abort", True, failure=e.failure.kind)
            else:  # no answer (a dropped upload): the run stops saying so, never ends as if all were done
                self.session.stop(f"batch not submitted: {e}", "abort", True, failure="server_error")
            return False
        if info is None:  # quota, and no waiting: the rest is for the next run
            self._give_back(entry, items, "not submitted: the batch quota is full")
            return False
        entry.name = info.name
        self.open[entry.id] = OpenBatch(entry, state=info.state)
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
                try:
                    return await self.api.get(names[0])
                except (ApiError, Unknown):  # it exists, whatever its state: the poller looks again
                    return BatchInfo(name=names[0], display_name=entry.display_name, state="")
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
        self.log(f"batch {entry.display_name}: {why.rstrip('. ')}; {plural(len(items), 'item')} left to do")
        for item in items:  # left for a later run: an edit chain's parent among them adds no child now
            self.feed.finished(item, None)

    async def _upload_refs(self, items: list[Item]) -> list[Item]:
        """Reference images (an edit chain's parent images too) go to the Files API once each, and
        every request names them: an image many items use is never inlined in every line. An item
        whose image cannot be read (changed, gone) fails alone, as `bad_request`; the rest go on."""
        usable, refused = [], []
        for item in items:
            try:
                for image in item.inputs:
                    if image.sha256 is None or image.url is not None or image.sha256 in self.refs:
                        continue
                    data = await anyio.to_thread.run_sync(self.inputs.read, image)
                    file = await self.api.upload_bytes(
                        data, f"runner-ref-{image.sha256[:16]}", image.mime or "image/png"
                    )
                    self.refs[image.sha256] = str(file.get("uri") or file["name"])
                    self.store.append_ledger({"event": "ref", "sha256": image.sha256, "file": file["name"],
                                              "uri": self.refs[image.sha256], "at": stamp()})  # fmt: skip
            except InputError as e:
                refused.append((item, Failure("bad_request", None, clean_message(str(e), self.api_key), final=True)))
                continue
            usable.append(item)
        for item, failure in refused:  # recorded now: no retry can read it either
            await self._back([item], failure, sent=False)
        return usable

    def _say_open(self) -> None:
        self.stats.open_batches = len(self.open)
        if self.open:
            names = ", ".join(b.entry.name or b.entry.display_name for b in list(self.open.values())[:3])
            more = f" and {len(self.open) - 3} more" if len(self.open) > 3 else ""
            self.log(
                printable(
                    f"{plural(len(self.open), 'batch', 'batches')} {'stays' if len(self.open) == 1 else 'stay'} open on the "
                    f"server ({names}{more}): a later run collects them"
                )
            )


def _epoch(stamp: Any) -> float:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0
