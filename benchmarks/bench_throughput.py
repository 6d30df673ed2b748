"""Throughput of a whole runner run against the mock gateway, next to a minimal aiohttp loop that does the same work.

Workloads (issue 13; the mock runs in its own process, answers are JPEGs padded to the size):

    w200ms  1,280 requests, 200 ms latency,  64 in flight,  64 KB images (ideal 4.0 s)
    w0      1,500 requests,   0 latency,     32 in flight, 256 KB images (client overhead)
    w1s     5,000 requests,   1 s latency,  256 in flight,  64 KB images (ideal 20 s)
    w1mb      640 requests,   0 latency,     64 in flight,   1 MB images
    floor   2,000 requests,   0 latency,     64 in flight,  ~2 KB PNGs (the old figures' size)

Contenders, each run in a fresh child process (so peak RSS is its own), fsync on and off:

- `loop`: common.aiohttp_loop, the plainest aiohttp program doing the same useful work as
  runner: POST runner's body, read it, json-parse it, base64-decode the image, write it
  (temp + fsync + rename + fsync of the folder; no fsyncs for `no-fsync`);
- `runner`: runner's whole run_job_async (lock, resume scan, planning, pool, retries,
  decode, checks, sha256, images, group-committed manifest), durable=True / False;
- `runner[NAME]`: the same from another copy of the package (`--src NAME=DIR`, DIR holding
  `runner/`): patched copies measured side by side with today's, in the same interleaved runs.

Each child first does one warm-up wave (imports, first connections; not with --quick), then
the measured run.
Printed per contender (medians of --repeat interleaved runs): wall seconds, requests/s, the
ratio to the loop with the same fsync setting (>1: faster than the loop), achieved/ideal
(latency workloads), client CPU ms per request (getrusage, all threads of the child) and its
ratio to the loop's, the child's peak RSS over the measured run (VmHWM, reset after warm-up)
and the mock's busy share (its CPU seconds / wall seconds: near 100% means the mock was the
limit, not the client).

    python benchmarks/bench_throughput.py                        # all workloads, ~12 min
    python benchmarks/bench_throughput.py --workload w0 --durable on
    python benchmarks/bench_throughput.py --src p1=/tmp/copy-with-patch-1   # A/B a patched copy
    python benchmarks/bench_throughput.py --workload w0 --repeat 1 --py-spy /tmp/prof   # profiles
    python benchmarks/bench_throughput.py --quick                # smoke run, < 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    TRANSPORTS,
    bodies,
    load_average,
    load_spec,
    machine,
    median,
    mock_server,
    peak_rss_bytes,
    proc_cpu_s,
    reset_peak_rss,
    rss_bytes,
    run_aiohttp_loop,
    runner_run,
    scratch,
    split_items,
    table,
    write_prompts,
    write_spec,
)

KB = 1024
CACHE_BYTES = 200 << 20  # keep every distinct image in the mock's cache (256 MB, 1,024 entries)


@dataclass(frozen=True)
class Workload:
    name: str
    latency: float
    concurrency: int
    requests: int
    image_bytes: int  # 0: the mock's plain ~2 KB PNG
    quick_requests: int

    @property
    def mime(self) -> str:
        return "jpeg" if self.image_bytes else "png"

    @property
    def max_distinct(self) -> int:
        per_image = max(self.image_bytes, 4 * KB) * 4 // 3
        return max(16, min(1000, CACHE_BYTES // per_image))

    def describe(self, n: int) -> str:
        size = f"{self.image_bytes // KB} KB JPEG" if self.image_bytes else "~2 KB PNG"
        return f"{self.name}: {n} requests, latency {self.latency:g}s, {self.concurrency} in flight, {size}"


WORKLOADS = {
    w.name: w
    for w in (
        Workload("w200ms", 0.2, 64, 1280, 64 * KB, 128),
        Workload("w0", 0.0, 32, 1500, 256 * KB, 96),
        Workload("w1s", 1.0, 256, 5000, 64 * KB, 256),
        Workload("w1mb", 0.0, 64, 640, 1024 * KB, 32),
        Workload("floor", 0.0, 64, 2000, 0, 64),
    )
}


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str  # loop | runner
    durable: bool
    transport: str = "aiohttp"
    src: str | None = None  # RUNNER_SRC for this child

    @property
    def yardstick(self) -> str:
        return "loop" + ("" if self.durable else " no-fsync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=list(WORKLOADS), action="append", help="repeatable; default: all")
    ap.add_argument("--requests", type=int, help="override every workload's request count")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each contender; the median is shown")
    ap.add_argument("--durable", choices=("on", "off", "both"), default="both", help="fsyncs, for loop and runner")
    ap.add_argument("--transport", choices=TRANSPORTS, action="append", help="runner's transport (default: aiohttp)")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=DIR", help="also measure the runner in DIR")
    ap.add_argument("--no-loop", action="store_true", help="skip the loop rows (ratios then read n/a)")
    ap.add_argument("--no-runner", action="store_true", help="only the --src copies, not this one")
    ap.add_argument("--py-spy", metavar="DIR", help="record a py-spy profile of every child into DIR (slows them)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few requests, one run, fsync on, < 30 s")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the mock and cleans up
    names = args.workload or (["w200ms", "w0", "w1s", "w1mb", "floor"])
    repeat = 1 if args.quick else args.repeat
    durables = [True] if args.quick else {"on": [True], "off": [False], "both": [True, False]}[args.durable]
    transports = args.transport or ["aiohttp"]
    contenders = make_contenders(args, durables, transports)
    print(f"bench_throughput: {machine()}; mock in its own process; each contender in a fresh child process")
    work = scratch("throughput")
    summary: list[list[Any]] = []
    try:
        for name in names:
            w = WORKLOADS[name]
            n = args.requests or (w.quick_requests if args.quick else w.requests)
            summary += bench_workload(w, n, contenders, repeat, work / name, args.py_spy, warm=not args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["workload", "client", "vs loop", "CPU ms/req", "CPU vs loop", "peak RSS MB"]
    table(headers, summary, f"summary (medians of {repeat}); {load_average()} now")
    return 0


def make_contenders(args: argparse.Namespace, durables: list[bool], transports: list[str]) -> list[Contender]:
    out: list[Contender] = []
    for d in durables:
        suffix = "" if d else " no-fsync"
        if not args.no_loop:
            out.append(Contender("loop" + suffix, "loop", d))
        if not args.no_runner:
            for t in transports:
                label = "runner" + ("" if t == "aiohttp" else f"/{t}")
                out.append(Contender(label + suffix, "runner", d, t))
        for spec in args.src:
            name, _, path = spec.partition("=")
            if not path or not (Path(path) / "runner").is_dir():
                raise SystemExit(f"--src {spec!r}: expected NAME=DIR with DIR/runner/")
            out.append(Contender(f"runner[{name}]" + suffix, "runner", d, "aiohttp", str(Path(path).resolve())))
    return out


def bench_workload(
    w: Workload, n: int, contenders: list[Contender], repeat: int, work: Path, py_spy: str | None, warm: bool = True
) -> list[list[Any]]:
    conc = w.concurrency
    distinct, repeats = split_items(n, w.max_distinct)
    work.mkdir(parents=True)
    prompts = write_prompts(work / "prompts.txt", distinct)
    pad = max(0, w.image_bytes - 3 * KB)  # the 128 x 128 JPEG itself is ~3 KB
    with mock_server(latency_s=w.latency, pad_bytes=pad, mime=w.mime) as mock:
        spec_path = write_spec(work, distinct, mock.base_url, concurrency=conc, prompts=prompts, repeats=repeats)
        warm_n = min(distinct, conc, 32)
        warm_path = write_spec(work / "warm", warm_n, mock.base_url, concurrency=conc, prompts=prompts)
        # Every distinct image into the mock's cache first, so it never renders during a measured run.
        payloads = bodies(load_spec(spec_path))
        assert len(payloads) == n, (len(payloads), n)
        run_aiohttp_loop(mock.base_url, payloads[:distinct], min(distinct, 500))
        mock.reset()
        runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in contenders}
        for r in range(repeat):
            for c in contenders:
                cfg = {
                    "kind": c.kind, "durable": c.durable, "transport": c.transport, "spec": str(spec_path),
                    "warm": str(warm_path) if warm else None, "base_url": mock.base_url, "concurrency": conc,
                    "out": str(work / f"out-{r}"), "mock_pid": mock.proc.pid,
                }  # fmt: skip
                prof = None
                if py_spy:
                    slug = c.label.replace(" ", "_").replace("/", "-")
                    prof = str(Path(py_spy) / f"{w.name}-{slug}-{r}.txt")
                res = run_child(cfg, c.src, prof)
                if res["ok"] != n:
                    raise RuntimeError(f"{w.name} {c.label}: {res['ok']} of {n} requests succeeded")
                runs[c.label].append(res)
                shutil.rmtree(work / f"out-{r}", ignore_errors=True)
        stats = mock.stats()
    return report(w, n, distinct, repeats, contenders, runs, repeat, stats)


def run_child(cfg: dict[str, Any], src: str | None, profile: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    if src:
        env["RUNNER_SRC"] = src
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)]
    if profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--format", "raw", "--rate", "250", "--threads", "-o", profile, "--", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def child(cfg: dict[str, Any]) -> int:
    """One measured run in this fresh process; prints one JSON line."""
    out = Path(cfg["out"])
    spec, warm = load_spec(cfg["spec"]), load_spec(cfg["warm"]) if cfg["warm"] else None
    conc, durable, base_url = cfg["concurrency"], cfg["durable"], cfg["base_url"]
    if cfg["kind"] == "loop":
        payloads = bodies(spec)
        if warm is not None:
            run_aiohttp_loop(base_url, bodies(warm), conc, out / "warm", durable)
        rss0 = rss_bytes()
        reset_peak_rss()
        mock0 = proc_cpu_s(cfg["mock_pid"])
        timing = run_aiohttp_loop(base_url, payloads, conc, out / "run", durable)
    else:
        kw = {"transport": cfg["transport"], "concurrency": conc, "durable": durable}
        if warm is not None:
            asyncio.run(runner_run(warm, out / "warm", base_url, **kw))
        rss0 = rss_bytes()
        reset_peak_rss()
        mock0 = proc_cpu_s(cfg["mock_pid"])
        timing, result = asyncio.run(runner_run(spec, out / "run", base_url, **kw))
        if result.failed or result.aborted:
            raise SystemExit(f"runner run failed: {result.failures_by_kind} {result.stop_reason}")
    mock_cpu = proc_cpu_s(cfg["mock_pid"]) - mock0
    res: dict[str, Any] = {"seconds": timing.seconds, "cpu_s": timing.cpu_s, "ok": timing.ok, "rss_base": rss0}
    res |= {"rss_peak": peak_rss_bytes(), "mock_cpu_s": mock_cpu, "image_bytes": timing.extra.get("image_bytes")}
    print(json.dumps(res))
    return 0


def report(
    w: Workload,
    n: int,
    distinct: int,
    repeats: int,
    contenders: list[Contender],
    runs: dict[str, list[dict[str, Any]]],
    repeat: int,
    stats: dict[str, Any],
) -> list[list[Any]]:
    def med(label: str, key: str) -> float:
        return median([r[key] for r in runs[label]])

    ideal = math.ceil(n / w.concurrency) * w.latency
    rows, summary = [], []
    for c in contenders:
        secs, cpu = med(c.label, "seconds"), med(c.label, "cpu_s")
        has_loop = c.yardstick in runs
        ratio = f"{med(c.yardstick, 'seconds') / secs:.2f}x" if has_loop else "n/a"
        cpu_ratio = f"{cpu / med(c.yardstick, 'cpu_s'):.2f}x" if has_loop else "n/a"
        busy = median([r["mock_cpu_s"] / r["seconds"] for r in runs[c.label]])
        rss = med(c.label, "rss_peak") / 1e6
        row: list[Any] = [c.label, secs, f"{n / secs:.0f}", ratio]
        if w.latency:
            row.append(f"{ideal / secs:.2f}")
        row += [f"{cpu / n * 1e3:.2f}", cpu_ratio, f"{rss:.0f}", f"{busy:.0%}"]
        rows.append(row)
        summary.append([w.name, c.label, ratio, f"{cpu / n * 1e3:.2f}", cpu_ratio, f"{rss:.0f}"])
    headers = ["client", "seconds", "req/s", "vs loop"]
    if w.latency:
        headers.append(f"achieved/ideal ({ideal:.1f}s)")
    headers += ["CPU ms/req", "CPU vs loop", "peak RSS MB", "mock busy"]
    sizes = [r["image_bytes"] for label in runs for r in runs[label] if r.get("image_bytes")]
    size = f"; image {sizes[0] / n / KB:.0f} KB decoded" if sizes else ""
    title = (
        f"{w.describe(n)} ({distinct} prompts x {repeats}){size}; median of {repeat}; "
        f"most in flight at the mock: {stats['max_in_flight']}; {load_average()}"
    )
    table(headers, rows, title)
    return summary


if __name__ == "__main__":
    sys.exit(main())
