"""A million items: dry run, item expansion, and resume start-up on a million-line manifest.

Everything is generated under /tmp and removed afterwards (--keep keeps it):

- a spec whose prompt file has N lines (default 1,000,000; one model, one image config);
- for the resume figures, a manifest of N realistic `ok` lines (the fields run_job writes:
  ids, prompt, usage, cost, sha256, mtime_ns, ...) and, by default, a real image file for
  every line (a 68-byte PNG stub in images/ab/<id>.png, so resume's size + mtime check
  really stats a million files; --images none skips them: every record then counts as
  "image missing", which times the same stat calls failing).

Each measurement runs in a fresh child process, so its peak RSS (the kernel's VmHWM, imports
included) is its own:

- dry run: load_spec (which counts the prompt file) + pricing.estimate(), and the same through
  the CLI (`runner estimate --json`), before and after the manifest exists;
- iter_items: time, peak RSS and tracemalloc peak of expanding the spec to N items;
- resume: manifest.scan() alone, then the whole start-up of a rerun (run_job_async: lock,
  repair, scan, planning pass over the spec; every item is done, so nothing is sent), and
  the same through the CLI (`runner run --no-progress`).

    python benchmarks/bench_scale.py            # 1M items (about 3 minutes, ~4.5 GB of small files)
    python benchmarks/bench_scale.py --quick    # 100k items
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from common import (
    KEY,
    load_spec,
    machine,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    scratch,
    spawn_measured,
    table,
    write_prompts,
    write_spec,
)

from runner.engine.job import RunOptions, run_job_async
from runner.engine.plan import estimate
from runner.output import LocalSource, image_relpath
from runner.output.manifest import scan
from runner.pricing import PriceTable
from runner.spec.items import iter_items

PNG_STUB = b"\x89PNG\r\n\x1a\n" + b"\x00" * 60  # size + mtime is what resume checks; --verify would hash it
TARGETS = {"dry run s": 30.0, "dry run MB": 300.0, "resume s": 10.0}


# -- child phases: each prints one JSON line ----------------------------------------------------------
def phase_dryrun(d: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = load_spec(d / "spec.yaml")
    t1 = time.perf_counter()
    est = estimate(spec)
    t2 = time.perf_counter()
    return {
        "items": est["items"],
        "done": est["done"],
        "load_spec_s": t1 - t0,
        "estimate_s": t2 - t1,
        "total_s": t2 - t0,
    }


def phase_iter(d: Path) -> dict[str, Any]:
    spec = load_spec(d / "spec.yaml")
    base = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_items(spec))
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    reset_peak_rss()  # the traced pass below is slower and bigger; the row shows the untraced one
    tracemalloc.start()
    sum(1 for _ in iter_items(spec))
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "items": n,
        "total_s": seconds,
        "rss_growth": peak - base,
        "tracemalloc_peak": traced,
        "untraced_peak": peak,
    }


def phase_scan(d: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = scan(d / "out", LocalSource(d / "out").intact)
    return {"done": len(state.done), "bad_images": len(state.bad_images), "total_s": time.perf_counter() - t0}


def phase_resume(d: Path) -> dict[str, Any]:
    import asyncio

    t0 = time.perf_counter()
    spec = load_spec(d / "spec.yaml")
    t1 = time.perf_counter()
    options = RunOptions(api_key=KEY, progress=False, base_url="http://127.0.0.1:9/v1")
    result = asyncio.run(run_job_async(spec, options, log=lambda _m: None))
    t2 = time.perf_counter()
    return {
        "items": result.items,
        "skipped_done": result.skipped_done,
        "to_run": result.to_run,
        "load_spec_s": t1 - t0,
        "run_s": t2 - t1,
        "total_s": t2 - t0,
    }


PHASES = {"dryrun": phase_dryrun, "iter": phase_iter, "scan": phase_scan, "resume": phase_resume}


def child(phase: str, d: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its JSON result (with its own VmHWM as peak_rss)."""
    _, _, out = spawn_measured([sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--dir", str(d)])
    return json.loads(out.strip().splitlines()[-1])


# -- generation --------------------------------------------------------------------------------------------
def write_manifest(d: Path, images: bool) -> tuple[int, float, float]:
    """A manifest line (as run_job writes it) for every item of the spec; an image file for each if asked."""
    spec = load_spec(d / "spec.yaml")
    out = d / "out"
    (out / "images").mkdir(parents=True, exist_ok=True)
    price = PriceTable(spec.pricing)
    sha = hashlib.sha256(PNG_STUB).hexdigest()
    made: set[str] = set()
    n = 0
    t_img = 0.0
    t0 = time.perf_counter()
    with (out / "manifest.jsonl").open("wb", buffering=1 << 20) as f:
        for item in iter_items(spec):
            rel = image_relpath(item.item_id, "image/png")
            mtime_ns = 0
            if images:
                t = time.perf_counter()
                folder = rel[:10]
                if folder not in made:
                    (out / folder).mkdir(exist_ok=True)
                    made.add(folder)
                fd = os.open(out / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, PNG_STUB)
                    mtime_ns = os.fstat(fd).st_mtime_ns
                finally:
                    os.close(fd)
                t_img += time.perf_counter() - t
            rec = {
                **item.record_fields(),
                "status": "ok",
                "attempts": 1,
                "request_id": f"chatcmpl-20261125084512{n:06d}000AbCdEfGh",
                "usage": {"prompt_tokens": 17, "completion_tokens": 1390, "total_tokens": 1407},
                "cost_usd": price.item(item),
                "latency_s": 12.345,
                "elapsed_s": 12.351,
                "image_path": rel,
                "mime": "image/png",
                "bytes": len(PNG_STUB),
                "sha256": sha,
                "mtime_ns": mtime_ns,
                "finished_at": "2026-11-25T08:45:12.345+00:00",
                "run_id": "0123456789ab",
            }
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
            n += 1
    return n, time.perf_counter() - t0, t_img


# -- the driver ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--images", choices=("all", "none"), default="all", help="write an image file per manifest line")
    ap.add_argument("--quick", action="store_true", help="100,000 items")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        res = PHASES[args.phase](args.dir)
        res["peak_rss"] = peak_rss_bytes()
        print(json.dumps(res))
        return 0

    n = 100_000 if args.quick else args.items
    print(f"bench_scale: {machine()}; {n:,} items")
    d = scratch("scale")
    rows: list[list[Any]] = []
    env = {**os.environ, "RUNNER_BENCH_KEY": KEY}
    try:
        t = time.perf_counter()
        write_prompts(d / "prompts.txt", n)
        write_spec(d, n, prompts=d / "prompts.txt")
        gen_prompts = time.perf_counter() - t

        r = child("dryrun", d)
        assert r["items"] == n, r
        rows.append(["dry run (load_spec + estimate), no manifest", r["total_s"], r["peak_rss"],
                     f"load_spec {r['load_spec_s']:.2f}s + estimate {r['estimate_s']:.2f}s"])  # fmt: skip
        wall, peak, _ = spawn_measured([sys.executable, "-m", "runner", "estimate", str(d / "spec.yaml"), "--json"])
        rows.append(["`runner estimate --json` (CLI, whole process)", wall, peak, "no manifest"])
        dry_s, dry_peak = wall, peak

        r = child("iter", d)
        rows.append(["iter_items over the spec", r["total_s"], r["untraced_peak"],
                     f"RSS growth {r['rss_growth'] / 1e6:.0f} MB, tracemalloc peak {r['tracemalloc_peak'] / 1e6:.0f} MB"])  # fmt: skip

        lines, gen_manifest, gen_images = write_manifest(d, args.images == "all")
        size = (d / "out" / "manifest.jsonl").stat().st_size
        note = f"{lines:,} lines, {size / 1e6:.0f} MB" + (
            f", {lines:,} image files (writing them took {gen_images:.0f}s)"
            if args.images == "all"
            else ", no image files"
        )

        r = child("scan", d)
        rows.append(["manifest.scan() (parse + stat every image)", r["total_s"], r["peak_rss"],
                     f"{r['done']:,} done, {r['bad_images']:,} image missing"])  # fmt: skip
        r = child("resume", d)
        assert r["items"] == n, r
        rows.append(["resume start-up: run_job_async, all done", r["total_s"], r["peak_rss"],
                     f"load_spec {r['load_spec_s']:.2f}s + run {r['run_s']:.2f}s; {r['skipped_done']:,} skipped, {r['to_run']:,} to run"])  # fmt: skip
        wall, peak, _ = spawn_measured(
            [sys.executable, "-m", "runner", "run", str(d / "spec.yaml"), "--no-progress"], env
        )
        rows.append(["`runner run --no-progress` (CLI, whole process)", wall, peak, "resume, nothing to do"])
        resume_s = wall
        wall, peak, _ = spawn_measured([sys.executable, "-m", "runner", "estimate", str(d / "spec.yaml"), "--json"])
        rows.append(["`runner estimate --json` (CLI) with the manifest", wall, peak, "dry run of a resumed job"])

        table(
            ["what", "seconds", "peak RSS MB", "notes"],
            [[w, s, f"{p / 1e6:.0f}", note_] for w, s, p, note_ in rows],
            f"{n:,} items; generated: prompt file {gen_prompts:.1f}s, manifest {gen_manifest:.0f}s ({note})",
        )
        scale = 1_000_000 / n
        table(
            ["target (2 cores, 1M items)", "limit", "measured", "met"],
            [
                ["dry run seconds", TARGETS["dry run s"], dry_s * scale, dry_s * scale < TARGETS["dry run s"]],
                ["dry run peak RSS MB", TARGETS["dry run MB"], dry_peak / 1e6, dry_peak / 1e6 < TARGETS["dry run MB"]],
                [
                    "resume start-up seconds",
                    TARGETS["resume s"],
                    resume_s * scale,
                    resume_s * scale < TARGETS["resume s"],
                ],
            ],
            "targets (CLI figures" + (", scaled linearly to 1M items)" if scale != 1 else ")"),
        )
    finally:
        if args.keep:
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
