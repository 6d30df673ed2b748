"""Shared pieces of the benchmarks: a mock gateway in its own process, spec files, the minimal
aiohttp loop every figure is compared with, runner runs with a chosen transport, and memory,
CPU and event-loop-stall helpers.

The mock gateway runs in a separate process (`python -m runner mock-server`), so it never
shares the GIL with the client being measured. Everything talks to 127.0.0.1 only. Set RUNNER_SRC to a directory holding another copy of the
`runner` package to measure that copy instead (both the client and the mock come from it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# RUNNER_SRC=/path/to/a/copy measures another checkout of the `runner` package (e.g. a patched copy).
ROOT = Path(os.environ.get("RUNNER_SRC") or REPO).resolve()
if str(ROOT) not in sys.path:  # `python benchmarks/bench_x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from runner import RunOptions, RunResult, run_job_async  # noqa: E402

try:  # the layout after issue 19; RUNNER_SRC may name a copy from before it
    from runner.gateway.formats import request_body
except ImportError:
    from runner.client import request_body  # type: ignore[no-redef]
from runner import iter_items  # noqa: E402
from runner.spec import JobSpec, load_spec  # noqa: E402, F401  (load_spec: for the scripts)

KEY = "sk-bench-0123456789"
# 'aiohttp': runner's own default transport (aiohttp, as runner.http.make_http builds it); 'httpx': httpx's own pool.
TRANSPORTS = ("httpx", "aiohttp")
os.environ.pop("RUNNER_HTTP_TRANSPORT", None)  # 'aiohttp' rows must be runner's default, whatever the shell says
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the mock gateway in its own process ---------------------------------------------------------
@dataclass
class MockServer:
    proc: subprocess.Popen[str]
    base_url: str

    def _call(self, method: str, path: str) -> dict[str, Any]:
        root = self.base_url.removesuffix("/v1")
        req = urllib.request.Request(root + path, method=method, data=b"" if method == "POST" else None)
        with _NO_PROXY.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/mock/stats")

    def reset(self) -> None:
        self._call("POST", "/mock/reset")

    def cpu_s(self) -> float:
        """User + system CPU seconds the mock process has used so far (all its threads)."""
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS bytes (this child's own ru_maxrss, via wait4) and output of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {out.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, out.decode()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def mock_server(latency_s: float = 0.0, pad_bytes: int = 0, scale: int = 8, mime: str = "png") -> Iterator[MockServer]:
    """`python -m runner mock-server` on a free loopback port, in its own process."""
    cmd = [sys.executable, "-m", "runner", "mock-server", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--latency", str(latency_s), "--pad-bytes", str(pad_bytes), "--scale", str(scale), "--mime", mime]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = MockServer(proc, "")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+/v1)", line)
        if not m:
            raise RuntimeError(f"mock server did not start: {line!r}")
        server.base_url = m.group(1)
        yield server
    finally:
        server.stop()


# -- specs ------------------------------------------------------------------------------------------
def write_prompts(path: Path, n: int, tag: str = "") -> Path:
    """n distinct prompts of realistic length, one a line."""
    styles = ("watercolor", "oil painting", "studio photo", "pencil sketch", "low-poly render", "film still")
    subjects = ("a red fox", "a heron", "a lighthouse", "a tram", "a teapot", "a mountain hut", "a koi pond")
    with path.open("w", encoding="utf-8", buffering=1 << 20) as f:
        for i in range(n):
            f.write(
                f"{subjects[i % 7]} at dusk, {styles[i % 6]}, wide shot, soft light, variant {tag}{i}\n"
            )  # ~70 characters
    return path


def split_items(n: int, max_distinct: int = 1000) -> tuple[int, int]:
    """(distinct prompts, repeats) with prompts x repeats == n and prompts <= max_distinct, so that
    the mock's image cache (1,024 entries) holds every image and the mock does not render per request."""
    repeats = -(-n // max_distinct)
    while n % repeats:
        repeats += 1
    return n // repeats, repeats


def write_spec(
    directory: Path,
    n: int,
    base_url: str = "http://127.0.0.1:9/v1",
    *,
    concurrency: int = 64,
    model: str = "nanobanana_pro",
    prompts: Path | None = None,
    inline: Sequence[str] = (),
    repeats: int = 1,
    timeout_s: float = 300,
    name: str = "bench",
) -> Path:
    """A spec over a prompt file of n lines (written unless `prompts` is given), or `inline` prompts;
    every prompt runs `repeats` times (n x repeats items)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"name: {name}", f"model: {model}", 'image_configs: [{aspect_ratio: "1:1"}]', f"repeats: {repeats}"]
    if inline:
        lines.append("prompts:")
        lines += [f"  - {json.dumps(p)}" for p in inline]
    else:
        prompts = prompts or write_prompts(directory / "prompts.txt", n)
        lines.append(f"prompt_files: [{json.dumps(str(prompts))}]")
    lines += [
        f"output_dir: {json.dumps(str(directory / 'out'))}",
        f"base_url: {base_url}",
        "api_key_env: RUNNER_BENCH_KEY",
        f"concurrency: {concurrency}",
        "max_attempts: 1",
        f"timeout_s: {timeout_s}",
        "max_consecutive_failures: 1000000",
    ]
    path = directory / "spec.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bodies(spec: JobSpec) -> list[dict[str, Any]]:
    """The JSON bodies the runner would send for the spec, in order."""
    return [request_body(item) for item in iter_items(spec)]


# -- the minimal aiohttp loop ----------------------------------------------------------------------
@dataclass
class Timing:
    seconds: float
    cpu_s: float
    requests: int
    ok: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


async def aiohttp_loop(
    base_url: str, payloads: Sequence[dict[str, Any]], concurrency: int, out: Path | None = None, durable: bool = True
) -> Timing:
    """The yardstick: the plainest aiohttp program that does the job.

    A semaphore of `concurrency` items (request and save, as each of runner's workers holds one
    item until it is saved) over one ClientSession; each request POSTs exactly the body runner
    sends, reads the answer, json-parses it and, with `out`, also does the useful work runner
    does: base64-decode the image and save it under out/images/xx/ (temp file, fsync, rename,
    fsync of the folder when `durable`, as runner's durable mode; in the default thread pool,
    so the event loop never waits on the disk). Without `out` it stops after the parse.
    Not done here, and so counted as runner's overhead: retries, limits, magic-byte check,
    sha256, the manifest, the resume scan. `extra["image_bytes"]` is the bytes decoded."""
    url = base_url + "/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "User-Agent": "bench"}
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    image_bytes = 0
    loop = asyncio.get_running_loop()
    folders = str(out / "images") if out is not None else ""
    if out is not None:
        for k in range(256):
            os.makedirs(f"{folders}/{k:02x}", exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_now()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(i: int, body: dict[str, Any]) -> None:
            nonlocal ok, image_bytes
            async with sem:
                async with session.post(url, json=body) as resp:
                    data = await resp.read()
                    status = resp.status
                answer = json.loads(data)
                if out is None:
                    ok += status == 200
                    return
                content = answer["choices"][0]["message"]["content"]
                start = content.index(";base64,") + 8
                image = base64.b64decode(content[start : content.index(")", start)])
                await loop.run_in_executor(None, save_file, f"{folders}/{i % 256:02x}", f"{i}.jpg", image, durable)
                image_bytes += len(image)
                ok += status == 200

        await asyncio.gather(*(one(i, b) for i, b in enumerate(payloads)))
    return Timing(time.perf_counter() - t0, cpu_now() - c0, len(payloads), ok, {"image_bytes": image_bytes})


def save_file(folder: str, name: str, data: bytes, durable: bool) -> None:
    """Write folder/name through a temp file and a rename; with `durable`, the file and the folder fsynced."""
    tmp = f"{folder}/.{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, f"{folder}/{name}")
    if durable:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_aiohttp_loop(
    base_url: str, payloads: Sequence[dict[str, Any]], concurrency: int, out: Path | None = None, durable: bool = True
) -> Timing:
    return asyncio.run(aiohttp_loop(base_url, payloads, concurrency, out, durable))


# -- the runner --------------------------------------------------------------------------------------
def make_transport(kind: str, concurrency: int) -> httpx.AsyncBaseTransport | None:
    """'aiohttp': None, i.e. runner's own default (aiohttp, built by runner.http.make_http); 'httpx': httpx's own pool.

    (Before 2026-11-27 'httpx' returned None too, so the committed 'httpx' rows ran over aiohttp.)"""
    if kind == "aiohttp":
        return None
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncHTTPTransport(limits=limits)
    raise ValueError(f"unknown transport {kind!r}; expected one of {', '.join(TRANSPORTS)}")


async def runner_run(
    spec: JobSpec,
    out: Path,
    base_url: str,
    *,
    transport: str,
    concurrency: int,
    durable: bool = True,
    progress: bool = False,
) -> tuple[Timing, RunResult]:
    """runner's whole run_job_async (lock, resume scan, pool, hashing, images, manifest) into `out`."""
    options = RunOptions(
        out=out,
        base_url=base_url,
        concurrency=concurrency,
        progress=progress,
        durable=durable,
        transport=make_transport(transport, concurrency),
        api_key=KEY,
    )
    saved = sys.stderr
    if progress:  # the bar is drawn (all its work is done) but into /dev/null, not over the table
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    t0, c0 = time.perf_counter(), cpu_now()
    try:
        result = await run_job_async(spec, options, log=lambda _msg: None)
    finally:
        if progress:
            sys.stderr.close()
            sys.stderr = saved
    return Timing(time.perf_counter() - t0, cpu_now() - c0, result.requests, result.ok), result


def run_runner(spec: JobSpec, out: Path, base_url: str, **kw: Any) -> Timing:
    timing, result = asyncio.run(runner_run(spec, out, base_url, **kw))
    if result.failed or result.aborted:
        raise RuntimeError(f"runner run failed: {result.failures_by_kind} {result.stop_reason}")
    return timing


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"runner-bench-{prefix}-", dir="/tmp"))


# -- memory ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset_peak_rss() (or since the start)."""
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


# -- event-loop stalls -------------------------------------------------------------------------------
class StallMeter:
    """A task that sleeps `tick_s` over and over and records how late it wakes up."""

    def __init__(self, tick_s: float = 0.01) -> None:
        self.tick_s = tick_s
        self.lateness: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.tick_s)
            self.lateness.append(max(0.0, loop.time() - t - self.tick_s))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def worst_s(self) -> float:
        return max(self.lateness, default=0.0)

    def quantile(self, q: float) -> float:
        if not self.lateness:
            return 0.0
        xs = sorted(self.lateness)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- output -------------------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Print a plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}, {load_average()}"
    )
