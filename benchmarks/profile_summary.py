"""Summarise py-spy profiles (`--format raw`, as `bench_throughput.py --py-spy DIR` records them) by function.

Stacks whose top frame is a thread waiting for work (py-spy's own idle detection misses these:
Condition.wait, a ThreadPoolExecutor worker's queue get, the event loop's select) are left
out unless --idle, so the shares are of the samples where the process was working. Prints: the functions with the most self time (the frame on top of
the stack), the functions with the most inclusive time (on the stack at all), and the self time
grouped by library (runner, aiohttp, httpx, anyio, tenacity, asyncio, the rest).

    python benchmarks/profile_summary.py /tmp/prof/w0-runner-0.txt [more files] [--top 30]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_GROUPS = (
    ("runner", "/runner/"),
    ("httpx_aiohttp", "httpx_aiohttp/"),
    ("httpx", "httpx/"),
    ("aiohttp", "aiohttp/"),
    ("yarl/multidict", "yarl/"),
    ("yarl/multidict", "multidict/"),
    ("anyio", "anyio/"),
    ("tenacity", "tenacity/"),
    ("asyncio", "asyncio/"),
    ("concurrent/threading", "concurrent/"),
    ("concurrent/threading", "threading.py"),
    ("json", "json/"),
    ("base64/binascii", "base64.py"),
    ("netrc/urllib", "netrc.py"),
    ("netrc/urllib", "urllib/"),
    ("pathlib/os", "pathlib.py"),
    ("pathlib/os", "<frozen os>"),
    ("pathlib/os", "posixpath.py"),
)


_IDLE_TOPS = (
    "Condition.wait (",
    "Event.wait (",
    "_worker (concurrent/futures/thread.py",
    "Queue.get (",
    "EpollSelector.select (",
    "select (selectors.py",
)


def frame_key(frame: str) -> tuple[str, str]:
    """(function with its file's short name, group) of one collapsed-stack frame."""
    m = _FRAME.match(frame)
    if not m:
        return frame, "other"
    path = m.group("file")
    short = "/".join(path.split("/")[-2:])
    group = next((name for name, needle in _GROUPS if needle in path), "other")
    return f"{m.group('func')} ({short})", group


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--idle", action="store_true", help="keep the samples of threads waiting for work")
    args = ap.parse_args()
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for path in args.files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames or (not args.idle and frames[-1].startswith(_IDLE_TOPS)):
                continue
            total += count
            keys = [frame_key(f) for f in frames]
            top, group = keys[-1]
            self_t[top] += count
            groups[group] += count
            for k in {k for k, _ in keys}:
                incl[k] += count
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples from {len(args.files)} file(s)\n")
    print("self time by group")
    for name, count in groups.most_common():
        print(f"  {count / total:6.1%}  {name}")
    print(f"\nself time, top {args.top}")
    for name, count in self_t.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    print(f"\ninclusive time, top {args.top}")
    for name, count in incl.most_common(args.top):
        print(f"  {count / total:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
