"""The process's open-file limit (RLIMIT_NOFILE): raised to what is allowed when a run starts, a
concurrency that fits it, and the words for "too many open files" that name the real cause.

A run holds one socket per request in flight (two with --mock: the mock's end is in this process
too), a few files of its own, and the folders of its output dir it keeps open. `ulimit -n` of 64
or 256 (macOS, some containers) is far below what `concurrency: 200` needs: the soft limit is
raised to the hard one, and if that is still too low the run goes at a concurrency that fits,
saying so once, rather than failing requests and saves with EMFILE.
"""

from __future__ import annotations

import os
import resource

from .errors import UsageError

# Descriptors a run needs beside its connections and the folders it keeps open: a temp file and a
# folder being synced per saver thread, DNS lookups, a CA file being read, some slack.
RESERVE = 24
DIR_CACHE = 320  # folders of an output dir kept open at most (images/00..ff, inputs/..): files.Jail
TIGHT = 2048  # below this soft limit, the output dir keeps few folders open
MIN_SPARE = 6  # beside one request's sockets: a temp file, a folder, a DNS lookup, some slack

_said: dict[str, int] = {}  # what the last fit() found, for describe()


def raise_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one (as far as the system allows); (soft, hard)
    after. When the limit stays tight, the output dir keeps fewer folders open (files.Jail)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = hard == resource.RLIM_INFINITY
    for target in (1 << 20, 10240) if unlimited else (hard,):
        if soft != resource.RLIM_INFINITY and soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # above the kernel's nr_open, or macOS's OPEN_MAX
            continue
        soft = target
        break
    from .output.files import Jail

    Jail.max_cached = DIR_CACHE if soft >= TIGHT else max(4, soft // 16)
    _said.update(soft=soft, hard=hard)
    return soft, hard


def open_fds() -> int:
    """How many descriptors this process has open now (Linux, macOS); 16 when it cannot tell."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 16


def fit(concurrency: int, per_request: int = 1) -> tuple[int, str | None]:
    """The concurrency that the open-file limit allows (at least 1), and the one message that says
    so when it is lower than asked (None when it fits). A limit that leaves no room for even one
    request beside what is open already is a UsageError: nothing has been sent."""
    from .output.files import Jail

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return concurrency, None
    now = open_fds()
    base = now + RESERVE + Jail.max_cached
    needed = base + per_request * concurrency
    _said.update(soft=soft, hard=hard, concurrency=concurrency, needed=needed)
    if needed <= soft:
        return concurrency, None
    hard_text = "the hard limit too" if hard == soft else f"hard limit {hard}"
    least = now + MIN_SPARE + per_request
    if soft < least:
        raise UsageError(
            f"too many open files: ulimit -n is {soft} ({hard_text}), too few to run at all: {now} are open "
            f"already and one request needs about {least - now} more; raise it (e.g. `ulimit -n {needed + 64}`)"
        )
    fits = max(1, (soft - base) // per_request)
    return fits, (
        f"too many open files: ulimit -n is {soft} ({hard_text}), and concurrency {concurrency} needs about "
        f"{needed}; running at concurrency {fits} instead (raise the limit, e.g. `ulimit -n {needed + 64}`, "
        f"to run at {concurrency})"
    )


def describe() -> str:
    """'too many open files' with the numbers that explain it, for an EMFILE anywhere in a run."""
    soft = _said.get("soft") or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    text = f"too many open files: ulimit -n is {soft}"
    if "needed" in _said:
        text += f", concurrency {_said['concurrency']} needs about {_said['needed']}"
    return text
