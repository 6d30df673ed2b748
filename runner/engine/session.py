"""What every backend of one run shares: its counts, its stop, its budget, and the sink its finished items go to.

The sink saves images in a few threads of its own and group-commits manifest lines in one more:
the interactive pool and the batch backend record an item the same way, through the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import OutputError
from ..output.files import FD_LIMIT
from ..record import Record
from ..spec.items import Item
from .budget import Budget
from .progress import Progress, RunStats
from .writer import OnBug, Writer

P = ParamSpec("P")
T = TypeVar("T")
Log = Callable[[str], None]

SAVE_THREADS = 8
COMMIT_DELAY_S = 0.05
# A save that fails for want of a file descriptor is tried again (the answer held in memory) while
# requests in flight give theirs back, for this long at most, with waits growing to HOLD_STEP_MAX_S.
HOLD_S = 120.0
HOLD_STEP_MAX_S = 2.0


class Session:
    """One run's shared state. `stop` is the one way anything ends the run early (Ctrl+C, an abort,
    the budget, the breaker); backends watch `stopping` and `stats.stop_reason`."""

    def __init__(
        self,
        writer: Writer,
        budget: Budget,
        *,
        log: Log = print,
        progress: Progress | None = None,
        on_bug: OnBug | None = None,
    ) -> None:
        self.writer = writer
        self.budget = budget
        self.log = log
        self.progress = progress
        self.on_bug: OnBug = on_bug or (lambda e, what: "nowhere")
        self.stats = RunStats()
        self.stopping = anyio.Event()
        self.on_stop: list[Callable[[], None]] = []  # told of any stop (a feed stops handing out items)
        self.sink = Sink(writer, self.stats, progress, log=log, on_output_error=self.output_failed)

    @property
    def is_stopping(self) -> bool:
        return self.stopping.is_set()

    def stop(
        self, reason: str, kind: str, abort: bool = False, *, drain: bool = False, failure: str | None = None
    ) -> None:
        """Start no new items; the ones in flight finish and are recorded. Unless `drain`, they
        also send nothing more: no first request still waiting for a slot, no retry. The first
        reason stands. `failure`: the failure kind that aborted the run (auth, no_balance, ...)."""
        s = self.stats
        if s.stop_reason is None:
            s.stop_reason, s.stop_kind, s.abort, s.stop_failure = reason, kind, abort, failure
            for tell in self.on_stop:
                tell()
        if not drain:
            self.stopping.set()

    def interrupt(self) -> None:
        self.stats.signalled = True
        self.stop("interrupted", "interrupt")

    def output_failed(self, error: OutputError) -> None:
        """The output dir cannot be written (disk full, ...): no new item starts, what is in flight
        finishes (its answers are tried, and counted if they cannot be kept); the run ends as aborted."""
        self.stop(str(error), "abort", True, failure="output")
        self.stats.output_problem = self.stats.output_problem or error.why or "output dir not writable"

    def unsaved(self, error: OutputError, cost: float, images: int) -> None:
        """A paid answer that could not be saved: counted (in the spend too) and said, never silently gone."""
        self.output_failed(error)
        if images:
            self.stats.unsaved += 1
            self.stats.unsaved_usd += cost
            self.stats.spent_usd += cost

    async def adopt(self, item: Item, on_disk: dict[int, list[str]]) -> Record | None:
        """An item whose whole image an earlier run saved but did not record (a kill between the
        two): its record, made from the files, paid for by that run. None: nothing whole on disk."""
        files = on_disk.pop(int(item.item_id, 16), None)
        if files is None:
            return None
        found = await self.sink.save(self.writer.recovered, item, files)
        if found is not None:
            self.budget.settle(0.0, found["cost_usd"], 0)  # paid for before the crash
        return found

    def budget_reached(self) -> None:
        spent = f"${self.budget.spent:.2f} spent of max_cost_usd {self.budget.max_usd:g}"
        # No new item starts; the ones in flight go on, each request within its reservation.
        self.stop(f"budget reached: {spent}", "budget", True, drain=True)


class Sink:
    """Where finished items go: images saved and lines built in SAVE_THREADS threads, lines
    group-committed by one task in one more thread, counted in the run's stats once committed."""

    def __init__(
        self,
        writer: Writer,
        stats: RunStats,
        progress: Progress | None,
        *,
        log: Log = print,
        on_output_error: Callable[[OutputError], None] | None = None,
    ) -> None:
        self.writer = writer
        self.stats = stats
        self.progress = progress
        self.log = log
        self.on_output_error = on_output_error
        self.savers: ThreadPoolExecutor | None = None  # images saved, lines built
        self._committer: ThreadPoolExecutor | None = None  # lines appended: never queued behind saves
        self._appending = True  # False once an append failed: nothing is glued onto a torn line
        self._held = 0  # answers held in memory, waiting for a file descriptor to save them
        self._said_held = False

    def open(self) -> None:
        """Start the threads (`start` does it too): for `save` and `commit_now` without the committing task."""
        if self.savers is None:
            self.savers = ThreadPoolExecutor(SAVE_THREADS, thread_name_prefix="runner-save")
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="runner-commit")

    def start(self, tg: TaskGroup, buffer: int) -> MemoryObjectSendStream[Record]:
        """Start the threads and the committing task; records sent to the stream returned are
        committed. Close every clone of it to let the task drain, then `shutdown`."""
        # Records are small (their images are on disk): room for what a commit delay gathers.
        send, recv = anyio.create_memory_object_stream[Record](max(buffer, 1024))
        self.open()
        tg.start_soon(self._commit, recv)
        return send

    async def commit_now(self, records: list[Record]) -> list[Record]:
        """Append these lines at once (fsynced when durable) and count them: when this returns
        they are in the manifest, whatever happens next (a batch is marked collected only after)."""
        records = await self.in_thread(self._committer, self.writer.commit, records, True)
        for rec in records:
            self.stats.count(rec)
        if self.progress:
            self.progress.update(self.stats)
        return records

    def shutdown(self) -> None:
        for executor in (self.savers, self._committer):
            if executor is not None:
                executor.shutdown(wait=True)  # every call was awaited (shielded): the threads are idle

    @staticmethod
    async def in_thread(
        executor: ThreadPoolExecutor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`fn` in one of the sink's disk threads; a cancelled caller still waits for it, so
        nothing writes into the output dir after the run has returned.

        Not anyio.to_thread: with 64 callers it costs ~80 us of CPU per call (its limiter, scopes
        and hand-off to a worker of its own), a plain executor ~30 us, and images are saved once
        per item (benchmarks/README.md). A few threads, not anyio's forty: a wave of 64 answers
        does not start 40 threads taking turns at the GIL. asyncio's executor, since runner runs
        on asyncio only (aiohttp needs it)."""
        assert executor is not None, "start() first"
        with anyio.CancelScope(shield=True):
            result = await asyncio.get_running_loop().run_in_executor(executor, lambda: fn(*args, **kwargs))
        return result

    async def save(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a Writer method (save an item's images, build its line) in a saver thread.

        A save that fails for want of a file descriptor (EMFILE, ENFILE) is not the end of a paid
        answer: it is held and tried again, the waits growing, while the requests in flight give
        their sockets back (HOLD_S at most). Any other OutputError is raised."""
        try:
            return await self.in_thread(self.savers, fn, *args, **kwargs)
        except OutputError as e:
            if e.errno not in FD_LIMIT:
                raise
            error = e
        self._held += 1
        if not self._said_held:  # once a run: the limit was said at the start, this is its consequence
            self._said_held = True
            self.log(f"{error.why}: holding answers in memory and trying their saves again until they can be saved")
        try:
            wait, waited = 0.05, 0.0
            while True:
                await anyio.sleep(wait)  # a third Ctrl+C still stops here: nothing else does
                waited += wait
                try:
                    return await self.in_thread(self.savers, fn, *args, **kwargs)
                except OutputError as e:
                    if e.errno not in FD_LIMIT or waited >= HOLD_S:
                        raise
                wait = min(wait * 2, HOLD_STEP_MAX_S)
        finally:
            self._held -= 1

    async def _commit(self, recv: MemoryObjectReceiveStream[Record]) -> None:
        async with recv:
            async for first in recv:
                # Group commit (as databases' commit_delay): the lines that come within
                # COMMIT_DELAY_S of the first share its write and fsync, one per wave of answers
                # rather than one per few items (~0.1 ms of CPU per item, benchmarks/README.md).
                # Their images are durable already: a crash meanwhile loses no paid image (the
                # next run adopts it). Shielded: a batch in hand is always written.
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(COMMIT_DELAY_S)
                batch = [first]
                while len(batch) < 1024:
                    try:
                        batch.append(recv.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if self._appending:
                    try:
                        batch = await self.in_thread(self._committer, self.writer.commit, batch)
                    except OutputError as e:  # the disk filled up under the manifest: its images are saved
                        self._appending = False
                        if self.on_output_error is None:
                            raise
                        self.on_output_error(e)
                if self._appending:
                    for rec in batch:
                        self.stats.count(rec)
                else:  # saved, not recorded: the next run adopts the images (recovered), never buys them again
                    for rec in batch:
                        self.stats.unrecorded += rec["status"] == "ok"
                        self.stats.spent_usd += rec["cost_usd"] if not rec.get("recovered") else 0.0
                if self.progress:
                    self.progress.update(self.stats)
