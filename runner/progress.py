"""How a run shows its progress: a tqdm bar on a terminal, or a status line every so often in a log."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

from tqdm import tqdm

from .pricing import usd

if TYPE_CHECKING:
    from .pool import RunStats


def status_line(stats: RunStats, now: float | None = None) -> str:
    """One grep-able line: items done of total, ok, failed, retries, dollars, rate, ETA."""
    now = time.monotonic() if now is None else now
    elapsed = max(1e-9, now - stats.started)
    rate = stats.done / elapsed * 60
    left = max(0, stats.total - stats.done)
    eta = _duration(left / rate * 60) if rate > 0 else "?"
    pct = f" ({stats.done / stats.total:.0%})" if stats.total else ""
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"[{stamp}] {stats.done}/{stats.total} items{pct}: {stats.ok} ok, {stats.failed} failed, "
        f"{stats.retries} retries, {usd(stats.spent_usd)} spent, {rate:.1f} items/min, ETA {eta}"
    )


def _duration(seconds: float) -> str:
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

    def __init__(self, write: object) -> None:
        self._write = write

    def update(self, stats: RunStats) -> None:
        pass

    def write(self, message: str) -> None:
        self._write(message)  # type: ignore[operator]

    def close(self) -> None:
        pass
