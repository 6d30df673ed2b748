"""What the pool's per-item machinery costs in CPU, each piece alone, with 64 callers at once.

The pool's hot path (issue 13) was chosen from these figures: a thread hop through
`anyio.to_thread.run_sync` against asyncio's executor in a shielded anyio scope (what
`pool.Pool._in_thread` does), a memory-object-stream hand-off, a capacity limiter, a cancel
scope, a tenacity `AsyncRetrying` call that succeeds at once. Each row is CPU microseconds per
call (user + system of the whole process, every thread), 64 tasks calling it in turn; the work
in the thread is nothing, so a row is the machinery alone. Medians of --repeat.

    python benchmarks/bench_hot_path.py
    python benchmarks/bench_hot_path.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.lowlevel
import anyio.to_thread
from common import cpu_now, machine, median, table
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt

TASKS = 64


def nothing() -> None:
    return None


async def per_call_us(make: Callable[[], Callable[[], Awaitable[object]]], calls: int) -> float:
    """CPU microseconds per call of what `make()` returns, TASKS tasks calling it in turn."""
    each = max(1, calls // TASKS)

    async def task() -> None:
        call = make()
        for _ in range(each):
            await call()

    c0 = cpu_now()
    async with anyio.create_task_group() as tg:
        for _ in range(TASKS):
            tg.start_soon(task)
    return (cpu_now() - c0) / (each * TASKS) * 1e6


async def measure(calls: int, repeat: int) -> list[list[str]]:
    limiter8 = anyio.CapacityLimiter(8)
    executor = ThreadPoolExecutor(8)
    gate = anyio.CapacityLimiter(TASKS)

    async def to_thread_default() -> None:
        await anyio.to_thread.run_sync(nothing)

    async def to_thread_8() -> None:
        await anyio.to_thread.run_sync(nothing, limiter=limiter8)

    async def shielded_executor() -> None:
        with anyio.CancelScope(shield=True):
            await asyncio.get_running_loop().run_in_executor(executor, nothing)

    async def limiter() -> None:
        async with gate:
            pass

    async def cancel_scope() -> None:
        with anyio.CancelScope():
            await anyio.lowlevel.checkpoint()

    async def checkpoint() -> None:
        await anyio.lowlevel.checkpoint()

    def tenacity_call() -> Callable[[], Awaitable[object]]:
        retrying = AsyncRetrying(stop=stop_after_attempt(3), retry=retry_if_result(lambda r: False))

        async def ok() -> int:
            return 1

        async def call() -> object:
            return await retrying(ok)

        return call

    def each(make: Callable[[], Callable[[], Awaitable[object]]]) -> Callable[[int], Awaitable[float]]:
        return lambda n: per_call_us(make, n)

    hops = calls // 10
    rows: list[tuple[str, Callable[[int], Awaitable[float]], int, str]] = [
        ("anyio.to_thread.run_sync (default limiter)", each(lambda: to_thread_default), hops, "before: commits"),
        ("anyio.to_thread.run_sync (limiter of 8)", each(lambda: to_thread_8), hops, "before: saves"),
        ("asyncio executor of 8, shielded scope", each(lambda: shielded_executor), hops, "now: Pool._in_thread"),
        ("tenacity AsyncRetrying call, first try ok", each(tenacity_call), calls, "now: after a failure only"),
        ("memory object stream hand-off", stream_us, calls, "before: feeder; now: lines"),
        ("capacity limiter enter and exit", each(lambda: limiter), calls, "AIMD concurrency"),
        ("cancel scope + checkpoint", each(lambda: cancel_scope), calls, "before: 2 a request; now 1"),
        ("bare checkpoint", each(lambda: checkpoint), calls, ""),
    ]
    out = []
    for name, run, n, note in rows:
        out.append([name, f"{median([await run(n) for _ in range(repeat)]):.1f}", note])
    executor.shutdown()
    return out


async def stream_us(items: int) -> float:
    """CPU microseconds per item through a memory object stream from one feeder to TASKS receivers."""
    send, recv = anyio.create_memory_object_stream[int](TASKS)

    async def feed() -> None:
        async with send:
            for i in range(items):
                await send.send(i)

    async def drain(r: anyio.abc.ObjectReceiveStream[int]) -> None:
        async with r:
            async for _ in r:
                pass

    c0 = cpu_now()
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        async with recv:
            for _ in range(TASKS):
                tg.start_soon(drain, recv.clone())
    return (cpu_now() - c0) / items * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=64_000, help="calls per row (thread hops: a tenth)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few calls, once")
    args = ap.parse_args()
    calls, repeat = (6_400, 1) if args.quick else (args.calls, args.repeat)
    print(f"bench_hot_path: {machine()}")
    rows = anyio.run(measure, calls, repeat)
    table(["what", "CPU us per call", "in runner"], rows, f"{TASKS} tasks at once; median of {repeat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
