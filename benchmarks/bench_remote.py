"""A no-op start of a finished sharded job on S3: objects read and seconds (issue 24).

An S3-compatible server (moto) runs in this process on loopback. It holds a finished job of N items
(default 100,000) in 8 shards: one small image object per item, and the manifests in one of two
layouts, written straight into moto's store (not through HTTP, so that setting up is quick):

  parts    what runner left before issue 24: a part object per group commit of ~50 ms, 2 lines
           each (the issue measured 1,046 parts for 2,000 items), N/2 objects
  merged   what it leaves now: one object per shard's run, 8 objects

Each row is a fresh child process that starts shard 0/8 of the job (run_job_async: the lease, the
manifests, the image listing, the resume scan, planning; every item is done, so nothing is sent).
While it runs, this process counts the requests the server receives (its request log): object
reads (GET of a key), listings (GET with list-type), writes (PUT), deletes (DELETE, POST ?delete).

    python benchmarks/bench_remote.py                              # 100,000 items
    python benchmarks/bench_remote.py --quick                      # 10,000 items
    python benchmarks/bench_remote.py --before /tmp/runner-main    # also the code before, on its layout

`--before DIR` names a directory holding another copy of the `runner` package (the code before
issue 24: `git archive 20ed0e1 runner | tar -x -C DIR`); its row runs with RUNNER_SRC=DIR.
moto lists a prefix by walking the whole bucket on every request (S3 walks only the page it
returns), so on moto a listing costs ~0.3-1 s at 150,000 objects: the LIST column counts them, and
`listing s` times the same listing alone, to tell them apart from the reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from common import KEY, ROOT, load_spec, machine, scratch, table, write_prompts, write_spec

from runner.output import image_relpath
from runner.pricing import PriceTable
from runner.spec.items import iter_items

BUCKET = "bench"
PREFIX = "job"
SHARDS = 8
PNG_STUB = b"\x89PNG\r\n\x1a\n" + b"\x00" * 60  # the listing's size is what resume checks
LINES_PER_PART = 2


# -- the child: one start of shard 0/8 -----------------------------------------------------------------------
def phase_start(spec_path: Path) -> dict[str, Any]:
    import asyncio

    from runner import RunOptions, run_job_async
    from runner.spec.items import Shard

    spec = load_spec(spec_path)
    options = RunOptions(api_key=KEY, progress=False, base_url="http://127.0.0.1:9/v1", shard=Shard(0, SHARDS))
    said: list[str] = []
    t0 = time.perf_counter()
    result = asyncio.run(run_job_async(spec, options, log=said.append))
    return {"seconds": time.perf_counter() - t0, "items": result.items, "done": result.skipped_done,
            "to_run": result.to_run, "said": said[:4]}  # fmt: skip


# -- the server and its request log --------------------------------------------------------------------------
class Requests(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r'"(?:\x1b\[[\d;]*m)*([A-Z]+) (\S+) HTTP', record.getMessage())
        if not m:
            return
        method, path = m.groups()
        if method == "GET":
            kind = "LIST" if "list-type" in path or "prefix=" in path else "GET"
        elif method == "POST" and "delete" in path:
            kind = "DELETE"
        else:
            kind = method
        self.seen[kind] += 1


def start_moto() -> tuple[Any, str, Requests]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    requests = Requests()
    logger = logging.getLogger("werkzeug")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(requests)
    return server, f"http://{host}:{port}", requests


def backend() -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    regions = s3_backends[DEFAULT_ACCOUNT_ID]
    return regions["aws"] if "aws" in regions else regions["global"]


def populate(spec_path: Path, layout: str) -> tuple[int, int]:
    """A finished job in the bucket (emptied first): an image per item, the manifests as `layout`.
    Returns (items, manifest objects)."""
    s3 = backend()
    if BUCKET in s3.buckets:
        for key in list(s3.buckets[BUCKET].keys.keys()):
            s3.delete_object(BUCKET, key)
    else:
        s3.create_bucket(BUCKET, "us-east-1")
    spec = load_spec(spec_path)
    price = PriceTable(spec.pricing)
    sha = hashlib.sha256(PNG_STUB).hexdigest()
    lines: list[list[bytes]] = [[] for _ in range(SHARDS)]
    n = 0
    for item in iter_items(spec):
        rel = image_relpath(item.item_id, "image/png")
        s3.put_object(BUCKET, f"{PREFIX}/{rel}", PNG_STUB)
        rec = {
            **item.record_fields(), "status": "ok", "attempts": 1,
            "request_id": f"chatcmpl-20261201{n:06d}AbCdEfGh",
            "usage": {"prompt_tokens": 17, "completion_tokens": 1390, "total_tokens": 1407},
            "cost_usd": price.item(item), "latency_s": 12.345, "elapsed_s": 12.351, "image_path": rel,
            "mime": "image/png", "bytes": len(PNG_STUB), "sha256": sha, "mtime_ns": None, "width": None,
            "height": None, "finished_at": "2026-12-01T08:45:12.345+00:00", "run_id": f"run{int(item.item_id, 16) % SHARDS}",
        }  # fmt: skip
        lines[int(item.item_id, 16) % SHARDS].append(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        n += 1
    objects = 0
    for k, shard_lines in enumerate(lines):
        run = f"manifest.shard-{k}-of-{SHARDS}.part-20261201T080000Z-{uuid.uuid4().hex[:8]}"
        if layout == "merged":
            last = -(-len(shard_lines) // LINES_PER_PART)
            s3.put_object(BUCKET, f"{PREFIX}/{run}.upto-{last:06d}.jsonl", b"".join(shard_lines))
            objects += 1
            continue
        for seq, start in enumerate(range(0, len(shard_lines), LINES_PER_PART), 1):
            s3.put_object(
                BUCKET, f"{PREFIX}/{run}-{seq:06d}.jsonl", b"".join(shard_lines[start : start + LINES_PER_PART])
            )
            objects += 1
    return n, objects


def listing_seconds(endpoint: str) -> float:
    """The image listing alone, as the code after issue 24 does it (folder by folder, in parallel)."""
    import s3fs

    from runner.output.bucket import _tree

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
    t0 = time.perf_counter()
    _tree(fs, f"{BUCKET}/{PREFIX}", "images")
    return time.perf_counter() - t0


def measure(spec_path: Path, env: dict[str, str], requests: Requests) -> dict[str, Any]:
    requests.seen.clear()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--phase", "start", "--spec", str(spec_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the start failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["requests"] = dict(requests.seen)
    return result


def manifest_objects() -> int:
    return sum(1 for key in backend().buckets[BUCKET].keys if key.startswith(f"{PREFIX}/manifest"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="10,000 items")
    ap.add_argument("--before", type=Path, help="a copy of the runner package before issue 24 (RUNNER_SRC)")
    ap.add_argument("--phase", choices=["start"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase_start(args.spec)))
        return 0

    n = 10_000 if args.quick else args.items
    print(f"bench_remote: {machine()}; {n:,} items in {SHARDS} shards on moto (loopback)")
    d = scratch("remote")
    server, endpoint, requests = start_moto()
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_SRC"}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1", RUNNER_BENCH_KEY=KEY)  # fmt: skip
    rows: list[list[Any]] = []
    try:
        write_prompts(d / "prompts.txt", n)
        spec_path = write_spec(d, n, prompts=d / "prompts.txt")
        spec_path.write_text(spec_path.read_text().replace(json.dumps(str(d / "out")), f"s3://{BUCKET}/{PREFIX}"))
        contenders: list[tuple[str, str, dict[str, str]]] = []
        if args.before:
            contenders.append(("before (the code before issue 24)", "parts", {**env, "RUNNER_SRC": str(args.before)}))
        contenders += [
            ("after, first start on the old layout", "parts", env),
            ("after, on what it leaves (merged)", "merged", env),
        ]
        for what, layout, child_env in contenders:
            t = time.perf_counter()
            _, objects = populate(spec_path, layout)
            setup = time.perf_counter() - t
            listing = listing_seconds(endpoint)
            r = measure(spec_path, child_env, requests)
            assert r["to_run"] == 0 and r["done"] == r["items"], r
            seen = r["requests"]
            rows.append([what, f"{objects:,}", seen.get("GET", 0), seen.get("LIST", 0), seen.get("PUT", 0),
                         seen.get("DELETE", 0), r["seconds"], listing, manifest_objects()])  # fmt: skip
            print(f"  {what}: {r['seconds']:.1f}s (set up in {setup:.0f}s); said: {' | '.join(r['said'])[:300]}")
        table(
            ["no-op start of shard 0/8", "manifest objects", "GET", "LIST", "PUT", "DELETE", "seconds",
             "listing s", "manifest objects after"],
            rows,
            f"{n:,} items, {SHARDS} shards, one image object each; GET: objects read (manifests, spec.json, leases)",
        )  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
