"""Memory and event-loop stalls per request with big answers (~20 MB of base64 per image).

The mock gateway (its own process) pads every PNG to ~15 MB (`--pad-bytes`), so each answer is
~20 MB of JSON carrying a base64 data URI. 16 requests run with 4 in flight. Each contender
runs in a fresh child process (so freed memory of one does not hide the peak of the next):

- `aiohttp loop`: the minimal loop (read the body, json-parse it; no decoding, no files);
- `runner/httpx`, `runner/aiohttp`: runner's full run (parse off the loop, base64 decode, magic
  check, sha256, atomic image write with fsync, manifest) over each transport.

Printed per contender: seconds; peak RSS growth during the run (VmHWM, reset after a warm-up
request) divided by in-flight x response size, i.e. how many copies of an answer each request
in flight holds at the worst moment; the tracemalloc peak of a second run, in the same units;
and the event loop's lateness, measured by a task that sleeps 10 ms over and over (worst, 99th
percentile, and ticks later than 50 ms).

    python benchmarks/bench_request_memory.py
    python benchmarks/bench_request_memory.py --pad-mb 15 --concurrency 4 --requests 16
    python benchmarks/bench_request_memory.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    KEY,
    TRANSPORTS,
    StallMeter,
    aiohttp_loop,
    bodies,
    load_spec,
    machine,
    mock_server,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    runner_run,
    scratch,
    table,
    write_spec,
)

PROMPT = "a very detailed panorama of a harbour town at dawn, for the memory benchmark"


async def measure(kind: str, spec_path: Path, out: Path, base_url: str, conc: int, traced: bool) -> dict[str, Any]:
    spec = load_spec(spec_path)
    payloads = bodies(spec)
    if kind == "loop":
        await aiohttp_loop(base_url, payloads[:1], 1)  # warm-up: imports, first big answer
    else:
        warm = load_spec(write_spec(out / "warm", 1, base_url, concurrency=conc, inline=[PROMPT]))
        await runner_run(warm, out / "warm" / "out", base_url, transport=kind, concurrency=conc)
    meter = StallMeter(0.01)
    if traced:
        tracemalloc.start()
    base = rss_bytes()
    reset_peak_rss()
    meter.start()
    t0 = time.perf_counter()
    if kind == "loop":
        timing = await aiohttp_loop(base_url, payloads, conc)
        ok = timing.ok
    else:
        timing, result = await runner_run(spec, out / "run", base_url, transport=kind, concurrency=conc)
        ok = result.ok
    seconds = time.perf_counter() - t0
    await meter.stop()
    res: dict[str, Any] = {"ok": ok, "seconds": seconds, "rss_base": base, "rss_peak": peak_rss_bytes()}
    if traced:
        res["traced_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        late = sorted(meter.lateness)
        res["stall_worst"] = meter.worst_s
        res["stall_p99"] = meter.quantile(0.99)
        res["stalls_over_50ms"] = sum(x > 0.05 for x in late)
        res["ticks"] = len(late)
    return res


def child(args: argparse.Namespace) -> int:
    kind = "loop" if args.child == "aiohttp loop" else args.child.removeprefix("runner/")
    res = asyncio.run(measure(kind, args.spec, args.dir, args.base_url, args.concurrency, args.traced))
    print(json.dumps(res))
    return 0


def run_child(kind: str, spec: Path, d: Path, base_url: str, conc: int, traced: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec), "--dir", str(d)]
    cmd += ["--base-url", base_url, "--concurrency", str(conc)] + (["--traced"] if traced else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {out.stderr[-3000:]}")
    shutil.rmtree(d, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pad-mb", type=float, default=15.0, help="PNG padding in MB (the answer is ~4/3 of it)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="5 MB images, 8 requests")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    pad = int((5.0 if args.quick else args.pad_mb) * 1e6)
    n = 8 if args.quick else args.requests
    conc = args.concurrency
    print(f"bench_request_memory: {machine()}")
    work = scratch("reqmem")
    try:
        with mock_server(pad_bytes=pad) as mock:
            # One prompt repeated: every request is the same body, so the mock renders the image once.
            spec_path = write_spec(work, 1, mock.base_url, concurrency=conc, inline=[PROMPT], repeats=n)
            body = json.dumps(bodies(load_spec(spec_path))[0]).encode()
            req = urllib.request.Request(
                mock.base_url + "/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=60) as resp:
                size = len(resp.read())
            rows = []
            for kind in ("aiohttp loop", *(f"runner/{t}" for t in TRANSPORTS)):
                plain = run_child(kind, spec_path, work / "c", mock.base_url, conc, traced=False)
                traced = run_child(kind, spec_path, work / "c", mock.base_url, conc, traced=True)
                assert plain["ok"] == n and traced["ok"] == n, (plain, traced)
                unit = conc * size
                growth = plain["rss_peak"] - plain["rss_base"]
                rows.append([
                    kind, plain["seconds"], f"{growth / 1e6:.0f}", f"{growth / unit:.2f}",
                    f"{traced['traced_peak'] / 1e6:.0f}", f"{traced['traced_peak'] / unit:.2f}",
                    f"{plain['stall_worst'] * 1e3:.0f}", f"{plain['stall_p99'] * 1e3:.0f}",
                    f"{plain['stalls_over_50ms']}/{plain['ticks']}",
                ])  # fmt: skip
        table(
            ["client", "seconds", "peak RSS growth MB", "x (in-flight x answer)", "tracemalloc peak MB",
             "x (in-flight x answer) ", "worst stall ms", "p99 stall ms", "ticks late > 50 ms"],
            rows,
            f"{n} requests, {conc} in flight, answer {size / 1e6:.1f} MB (PNG padded by {pad / 1e6:.0f} MB); "
            f"unit = {conc} x {size / 1e6:.1f} MB = {conc * size / 1e6:.0f} MB",
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
