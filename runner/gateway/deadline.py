"""Request time limits on an "awake" clock: time the process spent stopped does not count."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class Deadlines:
    """Cancels each request's scope once it has been in flight for its limit of awake time.

    A wall-clock timeout (anyio.fail_after, a socket timeout) fires the moment a process
    stopped by Ctrl+Z or SIGSTOP for longer than timeout_s continues, and throws away
    answers that arrived in full meanwhile and were paid for. Here one clock task ticks; a
    tick that comes far later than asked (the process was not running) counts as one tick,
    so a stop does not eat the requests' time. A tick, not a wait for an event: elapsed
    time is what a timeout measures. Without `run` (no clock task), limits are plain
    wall-clock deadlines."""

    def __init__(self, tick_s: float = 1.0) -> None:
        self.tick_s = tick_s
        self._awake = 0.0
        self._scopes: dict[anyio.CancelScope, float] = {}
        self._running = False
        self.cancelled = False

    def cancel_all(self) -> None:
        """End every request in flight now, and any started later (a second Ctrl+C)."""
        self.cancelled = True
        for scope in list(self._scopes):
            scope.cancel()

    async def run(self) -> None:
        """The clock: run it in the pool's task group for as long as requests may be sent."""
        self._running = True
        last = anyio.current_time()
        # A tick this late means the process was not running (or the loop was starved, which
        # then only lengthens timeouts a little): count it as one tick.
        stall = 3 * self.tick_s
        try:
            while True:
                await anyio.sleep(self.tick_s)
                now = anyio.current_time()
                gap, last = now - last, now
                self._awake += self.tick_s if gap > stall else gap
                for scope, due in list(self._scopes.items()):
                    if self._awake >= due:
                        scope.cancel()
        finally:
            self._running = False

    @contextmanager
    def limit(self, seconds: float) -> Iterator[anyio.CancelScope]:
        """A cancel scope cancelled after `seconds` of awake time (check cancelled_caught), or
        by cancel_all. Without the clock task, a plain wall-clock deadline."""
        deadline = math.inf if self._running else anyio.current_time() + seconds
        with anyio.CancelScope(deadline=deadline) as scope:
            if self.cancelled:
                scope.cancel()
            self._scopes[scope] = self._awake + seconds if self._running else math.inf
            try:
                yield scope
            finally:
                self._scopes.pop(scope, None)
