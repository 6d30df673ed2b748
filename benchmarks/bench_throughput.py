"""Throughput of a whole runner run against the mock gateway, next to a minimal aiohttp loop.

For each latency (default: 0 s, which measures client overhead, and 0.2 s with 64 requests in
flight, which measures whether `concurrency` requests are kept busy), on one mock gateway in
its own process:

- `aiohttp loop`: the minimal loop of common.py (POST, read, json-parse; nothing else);
- `httpx loop/<transport>`: the same minimal loop through httpx's API (runner's
  make_http_client), to show what httpx's API costs before any bookkeeping (--no-httpx-loops);
- `runner/httpx`: runner's full run_job_async (resume scan, pool, base64 decode, sha256,
  images written, manifest) over httpx's default transport;
- `runner/aiohttp`: the same over httpx_aiohttp.AiohttpTransport (httpx's API, aiohttp's pool);

each with durable=True (fsyncs, the default) and/or durable=False. Every run is repeated and
the median is printed with requests/s, the ratio to the aiohttp loop's median, achieved/ideal
(ideal = ceil(requests / concurrency) x latency), the client process's CPU seconds and how
busy the mock process was (mock CPU / wall: near 100% would mean the mock is the bottleneck).

    python benchmarks/bench_throughput.py                 # 0 s and 0.2 s latency
    python benchmarks/bench_throughput.py --latency 0.2 --requests 1280 --concurrency 64
    python benchmarks/bench_throughput.py --quick
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from common import (
    TRANSPORTS,
    MockServer,
    bodies,
    load_spec,
    machine,
    median,
    mock_server,
    run_aiohttp_loop,
    run_httpx_loop,
    run_runner,
    scratch,
    split_items,
    table,
    write_prompts,
    write_spec,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--requests", type=int, help="requests per run (default: 2000 at 0 s latency, 20 x concurrency else)"
    )
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument(
        "--latency", type=float, action="append", help="mock latency in seconds (repeatable; default 0 and 0.2)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median is shown")
    ap.add_argument("--durable", choices=("on", "off", "both"), default="both", help="runner's fsyncs")
    ap.add_argument("--transport", choices=TRANSPORTS, action="append", help="default: both")
    ap.add_argument("--no-httpx-loops", action="store_true", help="skip the minimal loops through httpx")
    ap.add_argument("--progress", action="store_true", help="draw the progress bar (into /dev/null)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run: fewer requests, one repeat")
    args = ap.parse_args()
    latencies = args.latency or [0.0, 0.2]
    transports = args.transport or list(TRANSPORTS)
    durables = {"on": [True], "off": [False], "both": [True, False]}[args.durable]
    repeat = 1 if args.quick else args.repeat
    print(f"bench_throughput: {machine()}; concurrency {args.concurrency}; mock in its own process")
    print(
        "runner rows: full run_job_async (scan, pool, decode, sha256, images written, manifest); progress",
        "on" if args.progress else "off",
    )
    work = scratch("throughput")
    try:
        for latency in latencies:
            n = args.requests or (2000 if latency == 0 else 20 * args.concurrency)
            if args.quick:
                n = min(n, 4 * args.concurrency)
            with mock_server(latency_s=latency) as mock:
                bench_one(mock, work / f"lat{latency:g}", n, latency, args, transports, durables, repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bench_one(
    mock: MockServer,
    work: Path,
    n: int,
    latency: float,
    args: argparse.Namespace,
    transports: list[str],
    durables: list[bool],
    repeat: int,
) -> None:
    conc = args.concurrency
    distinct, repeats = split_items(n)
    work.mkdir(parents=True)
    prompts = write_prompts(work / "prompts.txt", distinct)
    spec = load_spec(write_spec(work, distinct, mock.base_url, concurrency=conc, prompts=prompts, repeats=repeats))
    payloads = bodies(spec)
    assert len(payloads) == n, (len(payloads), n)
    ideal = math.ceil(n / conc) * latency

    # Warm-up: imports, connection setup code paths, and every image into the mock's cache.
    run_aiohttp_loop(mock.base_url, payloads[:distinct], conc)
    warm = load_spec(write_spec(work / "warm", min(n, conc), mock.base_url, concurrency=conc, prompts=prompts))
    for t in transports:
        run_runner(warm, work / "warm" / f"out-{t}", mock.base_url, transport=t, concurrency=conc)

    contenders: list[tuple[str, str | None, bool | None]] = [("aiohttp loop", None, None)]
    if not args.no_httpx_loops:
        contenders += [(f"httpx loop/{t}", t, None) for t in transports]
    contenders += [
        (f"runner/{t}" + ("" if len(durables) == 1 else f" durable={d}"), t, d) for t in transports for d in durables
    ]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in contenders}
    for r in range(repeat):
        for name, transport, durable in contenders:
            mock_cpu0 = mock.cpu_s()
            if transport is None:
                timing = run_aiohttp_loop(mock.base_url, payloads, conc)
            elif durable is None:
                timing = run_httpx_loop(mock.base_url, payloads, conc, transport)
            else:
                out = work / f"out-{transport}-{durable}-{r}"
                timing = run_runner(
                    spec, out, mock.base_url, transport=transport, concurrency=conc, durable=bool(durable),
                    progress=args.progress,
                )  # fmt: skip
                shutil.rmtree(out, ignore_errors=True)
            if timing.ok != n:
                raise RuntimeError(f"{name}: {timing.ok} of {n} requests succeeded")
            runs[name].append((timing.seconds, timing.cpu_s, mock.cpu_s() - mock_cpu0))
    stats = mock.stats()

    base = median([s for s, _, _ in runs["aiohttp loop"]])
    rows = []
    for name, _, _ in contenders:
        secs = median([s for s, _, _ in runs[name]])
        cpu = median([c for _, c, _ in runs[name]])
        mock_busy = median([m / s for s, _, m in runs[name]])
        row = [name, secs, f"{n / secs:.0f}", f"{base / secs:.2f}x"]
        if latency:
            row.append(f"{ideal / secs:.2f}")
        row += [cpu, f"{cpu / n * 1e3:.2f}", f"{mock_busy:.0%}"]
        rows.append(row)
    headers = ["client", "seconds", "req/s", "vs aiohttp loop"]
    if latency:
        headers.append(f"achieved/ideal ({ideal:.1f}s)")
    headers += ["client CPU s", "CPU ms/req", "mock busy"]
    title = (
        f"latency {latency:g}s, {n} requests ({distinct} prompts x {repeats}), concurrency {conc}, "
        f"median of {repeat}" + (f"; most requests in flight at the mock: {stats['max_in_flight']}" if latency else "")
    )
    table(headers, rows, title)


if __name__ == "__main__":
    sys.exit(main())
