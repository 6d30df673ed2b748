"""A run's counts, and how they are shown: a tqdm bar on a terminal, or a status line every so often in a log."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from tqdm import tqdm

from ..pricing import usd
from ..record import Record


def status_line(stats: RunStats, now: float | None = None) -> str:
    """One grep-able line: items done of total, ok, failed, retries, dollars, rate, ETA."""
    now = time.monotonic() if now is None else now
    elapsed = max(1e-9, now - stats.started)
    rate = stats.done / elapsed * 60
    left = max(0, stats.total - stats.done)
    eta = duration(left / rate * 60) if rate > 0 else "?"
    pct = f" ({stats.done / stats.total:.0%})" if stats.total else ""
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"[{stamp}] {stats.done}/{stats.total} items{pct}: {stats.ok} ok, {stats.failed} failed, "
        f"{stats.retries} retries, {usd(stats.spent_usd)} spent, {rate:.1f} items/min, ETA {eta}"
    )


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 item`, `2 items` (`many` where adding an s is wrong)."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Bar:
    """The tqdm bar, for terminals only (in a log file its frames are noise)."""

    def __init__(self, total: int, desc: str = "images") -> None:
        self._bar = tqdm(total=total, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, stats: RunStats) -> None:
        if stats.total != self._bar.total:  # an edit chain's children are counted as they become known
            self._bar.total = stats.total
        # The postfix first, then the count: the refresh the count triggers shows both.
        self._bar.set_postfix_str(
            f"ok={stats.ok} failed={stats.failed} retries={stats.retries} {usd(stats.spent_usd)}", refresh=False
        )
        delta = stats.done - self._bar.n
        if delta > 0:
            self._bar.update(delta)
        else:
            self._bar.refresh()

    def write(self, message: str) -> None:
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


class Quiet:
    """No bar: messages go straight to the log; the job prints status lines on a timer."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def update(self, stats: RunStats) -> None:
        pass

    def write(self, message: str) -> None:
        self._write(message)

    def close(self) -> None:
        pass


class Progress(Protocol):
    def update(self, stats: RunStats) -> None: ...


@dataclass
class RunStats:
    """What one run did, counted once: the bar, the status lines and the summary all read it."""

    total: int = 0  # items this run set out to do
    ok: int = 0
    failed: int = 0
    interrupted: int = 0  # failed while a stop cut their retries short: they run next time
    recovered: int = 0  # adopted from whole images on disk
    retries: int = 0
    requests: int = 0
    spent_usd: float = 0.0
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    retries_by_kind: Counter[str] = field(default_factory=Counter)
    stop_reason: str | None = None  # why new items stopped starting (abort, budget, interrupt)
    stop_kind: str | None = None  # budget | abort | breaker | interrupt
    stop_failure: str | None = None  # the failure kind that aborted the run (auth, no_balance, ...)
    abort: bool = False
    signalled: bool = False
    open_batches: int = 0  # batch mode: batches left open on the server when the run ended
    started: float = field(default_factory=time.monotonic)
    adopted_usd: float = 0.0  # what recovered images cost (bought by an earlier run): not this run's spend
    unsaved: int = 0  # answers paid for that could not be saved (the output dir could not be written)
    unsaved_usd: float = 0.0  # their cost, counted in spent_usd
    unrecorded: int = 0  # images saved whose manifest lines could not be written (the next run adopts them)
    output_problem: str | None = None  # why the output dir could not be written ("disk full")

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.interrupted

    def count(self, rec: Record) -> None:
        """A committed record, counted once."""
        if rec["status"] == "ok":
            self.ok += 1
            if rec.get("recovered", False):  # bought before, by the run that died: not spent in this one
                self.recovered += 1
                self.adopted_usd += rec["cost_usd"]
                return
        elif rec.get("interrupted"):
            self.interrupted += 1
        else:
            self.failed += 1
            self.failures_by_kind[rec["error"]["kind"]] += 1
        self.spent_usd += rec["cost_usd"]
