"""Batch mode at scale: submit 100,000 items as 1,000 batches, then collect them, against the mock in its own process.

Three runs of the same job, each a `runner run` in a fresh child process (its peak RSS is its own,
read from the kernel when it exits), against one `runner mock-server --flavor gemini` process:

- submit: `runner run --no-wait`: plan, write each batch's requests file, upload, create (the
  mock's open-batch quota is lifted, so every batch goes at once);
- collect: `runner run` once every batch has ended: poll, download each results file to disk as
  a stream, read it a line at a time, save every image durably, commit the manifest;
- interactive: the same job with `mode: interactive` (generateContent at zero latency, 64 in
  flight): what the batch runs are compared with, for memory.

    python benchmarks/bench_batch.py            # 100,000 items (~4 minutes on 2 cores)
    python benchmarks/bench_batch.py --quick    # 10,000 items (~40 s)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import ROOT, load_average, machine, scratch, spawn_measured, table

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start_mock(state: Path, latency_s: float) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "runner", "mock-server", "--host", "127.0.0.1", "--port", "0", "--flavor", "gemini",
           "--scale", "8", "--batch-latency", str(latency_s), "--batch-max-open", "0", "--state-dir", str(state)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    m = re.search(r"listening on (http://\S+/v1beta)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("the mock did not start")
    return proc, m.group(1)


def write_job(d: Path, base_url: str, n: int, mode: str) -> Path:
    """n items: 1,000 prompts (the mock renders each once) x n/1000 repeats."""
    prompts = d / "prompts.txt"
    if not prompts.exists():
        with prompts.open("w") as f:
            for i in range(1000):
                f.write(f"a heron over the marsh at dawn, watercolor, variant {i}\n")
    spec = {
        "name": "batch-bench", "model": "nanobanana_pro", "prompt_files": ["prompts.txt"], "repeats": max(1, n // 1000),
        "output_dir": f"out-{mode}", "api_format": "gemini", "mode": mode, "base_url": base_url,
        "api_key_env": "BENCH_KEY", "concurrency": 64, "batch": {"max_requests": 100, "poll_s": 0.5},
    }  # fmt: skip
    path = d / f"{mode}.yaml"
    path.write_text(json.dumps(spec))
    return path


def run(args: list[str]) -> tuple[float, int, str]:
    """`runner ARGS` in a child: wall seconds, peak RSS bytes, output."""
    env = {**os.environ, "BENCH_KEY": "bench", "PYTHONPATH": str(ROOT)}
    return spawn_measured([sys.executable, "-m", "runner", *args], env=env)


def stats(base_url: str) -> dict[str, Any]:
    root = base_url.removesuffix("/v1beta")
    with _NO_PROXY.open(root + "/mock/stats", timeout=30) as resp:
        return dict(json.loads(resp.read())["google"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 items")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args()
    n = 10_000 if args.quick else args.items
    d = scratch("batch")
    print(f"bench_batch: {machine()}; {n:,} items, 100 a batch")
    mock, base = start_mock(d / "mock-state", latency_s=2.0)
    rows = []
    try:
        spec = write_job(d, base, n, "batch")
        sub_s, sub_rss, _ = run(["run", str(spec), "--no-wait", "--no-progress"])
        s = stats(base)
        rows.append(["submit (--no-wait)", f"{n:,}", sub_s, n / sub_s, sub_rss / 2**20, s["batches_created"]])
        time.sleep(2.5)  # the batches' life on the mock's clock
        col_s, col_rss, _ = run(["run", str(spec), "--no-progress", "--poll", "0.5"])
        s = stats(base)
        assert s["double_submits"] == 0 and s["paid"] == n, s
        ok = sum(1 for _ in (d / "out-batch" / "manifest.jsonl").open())
        rows.append(["collect", f"{ok:,}", col_s, ok / col_s, col_rss / 2**20, s["downloads"]])
        inter = write_job(d, base, n, "interactive")
        int_s, int_rss, _ = run(["run", str(inter), "--no-progress"])
        rows.append(["interactive (same job)", f"{n:,}", int_s, n / int_s, int_rss / 2**20, "-"])
    finally:
        mock.terminate()
        mock.wait()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    table(["run", "items", "seconds", "items/s", "peak RSS MB", "batches / downloads"], rows,
          title=f"batch mode, {n:,} items ({load_average()})")  # fmt: skip


if __name__ == "__main__":
    main()
