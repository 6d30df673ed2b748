"""The quality pass (runner.quality.analyze) and a WebDataset export over 100,000 small real images.

Makes an output dir of small PNGs (8x6 random colour blocks scaled to 64x64 or 64x36) with a
realistic share of trouble: 2% byte-identical repeats, 2% near copies (the same picture with a
little noise, other bytes), 0.5% blank, 1% the wrong shape; writes manifest.jsonl as the writer
does; then, each in a fresh process, measures wall time and peak RSS of:

    parse only    reading the manifest into records (what every pass pays anyway)
    QA cold       analyze() with no hash cache: every image decoded once
    QA cached     analyze() again: hashes from the cache beside the manifest
    export wds    export_webdataset() of every ok item into shards of 1,000

    python benchmarks/bench_quality.py            # 100,000 images, ~6 min, ~1 GB in /tmp
    python benchmarks/bench_quality.py --quick    # 10,000 images
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("RUNNER_SRC") or Path(__file__).resolve().parent.parent).resolve()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHUNK = 2000


def _picture(seed: int, size: tuple[int, int], noise: int = 0, blank: bool = False) -> bytes:
    from PIL import Image

    if blank:
        im = Image.new("RGB", size, (seed % 256, 40, 200))
    else:
        rng = random.Random(seed)
        small = Image.new("RGB", (8, 6))
        small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])  # type: ignore[misc]
        im = small.resize(size, Image.Resampling.BILINEAR)
        if noise:
            jitter = random.Random(noise)
            px = im.load()
            assert px is not None
            for _ in range(12):
                x, y = jitter.randrange(size[0]), jitter.randrange(size[1])
                r, g, b = px[x, y]  # type: ignore[misc]
                px[x, y] = (min(255, r + 3), g, b)
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _make_chunk(args: tuple[str, int, int]) -> list[str]:
    """Write images start..stop-1 and return their manifest lines."""
    out, start, stop = Path(args[0]), args[1], args[2]
    lines = []
    first: dict[int, bytes] = {}
    for n in range(start, stop):
        roll = random.Random(n).random()
        wrong = roll < 0.01
        ratio = "16:9" if n % 4 == 0 else "1:1"
        size = (64, 36) if ratio == "16:9" else (64, 64)
        if wrong:
            size = (64, 48)
        if 0.01 <= roll < 0.03 and n - 1 >= start:  # a byte-identical repeat of the previous image
            data = first.get(n - 1) or _picture(n - 1, size)
        elif 0.03 <= roll < 0.05:  # the previous picture again, with a little noise: a near copy
            data = _picture(n - 1, size, noise=n)
        else:
            data = _picture(n, size, blank=0.05 <= roll < 0.055)
        first[n] = data
        item_id = hashlib.sha256(f"bench{n}".encode()).hexdigest()[:20]
        rel = f"images/{item_id[:2]}/{item_id}.png"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rec = {
            "item_id": item_id, "prompt_id": f"p{n % 50}", "prompt": f"a picture number {n}", "model": "nanobanana_pro",
            "image_config": {"aspect_ratio": ratio, "image_size": None}, "repeat": 0,
            "vars": {"subject": ["cat", "fox", "heron"][n % 3]} if n % 2 else None, "status": "ok", "attempts": 1,
            "request_id": f"chatcmpl-{n}", "usage": {"prompt_tokens": 9, "completion_tokens": 1120, "total_tokens": 1129},
            "cost_usd": 0.134, "latency_s": 12.5, "elapsed_s": 13.0, "finished_at": "2026-11-25T08:00:00.000+00:00",
            "run_id": "bench", "image_path": rel, "mime": "image/png", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": path.stat().st_mtime_ns,
            "width": size[0], "height": size[1],
        }  # fmt: skip
        lines.append(json.dumps(rec))
    return lines


def make_dir(out: Path, count: int) -> float:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), s, min(s + CHUNK, count)) for s in range(0, count, CHUNK)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool, (out / "manifest.jsonl").open("w") as f:
        for lines in pool.map(_make_chunk, jobs):
            f.write("\n".join(lines) + "\n")
    return time.perf_counter() - started


def measure(mode: str, out: Path, dest: Path) -> None:
    """Child process: run one pass, print one JSON line with seconds, peak RSS and results."""
    from runner.quality import LocalSource, analyze
    from runner.record import parse_line

    started = time.perf_counter()
    with (out / "manifest.jsonl").open("rb") as f:
        records = [r for r in map(parse_line, f) if r is not None]
    parsed = time.perf_counter()
    found: dict[str, object] = {"records": len(records)}
    if mode in ("cold", "cached"):
        result = analyze(records, LocalSource(out), cache_path=out / ".quality-cache.tsv")
        found.update(
            duplicate_groups=len(result["duplicates"]),
            near_groups=len(result["near_duplicates"]),
            near_items=sum(len(g) for g in result["near_duplicates"]),
            size_mismatches=len(result["size_mismatches"]),
            uniform=len(result["uniform"]),
            hashes=result["hashes"],
        )
    elif mode == "export":
        from runner.export import export_webdataset

        result_w = export_webdataset(records, LocalSource(out), dest, shard_size=1000)
        found.update(written=result_w.written, shards=len(result_w.files) - 1, warnings=result_w.warnings)
    done = time.perf_counter()
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
    figures = {"parse_s": parsed - started, "pass_s": done - parsed, "cpu_s": cpu, "peak_mb": _peak_mb()}
    if mode == "cold":  # ru_maxrss survives exec (it counts the parent's pages at fork): ask a worker itself
        figures["worker_peak_mb"] = _worker_peak(out, [(r["sha256"], r["image_path"]) for r in records[:5000]])
    print(json.dumps({**figures, **found}))


def _worker_rss(jobs: list[tuple[str, str]]) -> float:
    from runner.quality.phash import _hash_jobs

    _hash_jobs(jobs)
    return _peak_mb()


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM, which starts afresh at exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _worker_peak(out: Path, jobs: list[tuple[str, str]]) -> float:
    """Peak RSS of a hashing worker process (spawned as analyze spawns them) after 5,000 images."""
    import multiprocessing

    from runner.quality import LocalSource
    from runner.quality.phash import _init_worker

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker, initargs=(LocalSource(out),)) as pool:
        return pool.submit(_worker_rss, jobs).result()


def run_child(mode: str, out: Path, dest: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(out), str(dest)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 images instead of 100,000")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "OUT", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    count = args.count or (10_000 if args.quick else 100_000)
    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-quality-"))
    try:
        out, dest = tmp / "out", tmp / "wds"
        made = make_dir(out, count)
        size_mb = sum(p.stat().st_size for p in out.rglob("*.png")) / 1e6
        print(f"{count:,} images ({size_mb:,.0f} MB of PNG) made in {made:.0f} s, {os.cpu_count()} cores\n")
        print(
            f"load average before: {os.getloadavg()[0]:.1f} (wall times stretch on a shared machine; CPU seconds do not)"
        )
        print(
            f"{'pass':<8} {'parse s':>8} {'pass s':>8} {'images/s':>9} {'CPU s':>7} {'RSS MB':>7} {'worker MB':>10}  result"
        )
        for mode in ("parse", "cold", "cached", "export"):
            row: dict[str, Any] = run_child(mode, out, dest)
            rate = count / row["pass_s"] if mode != "parse" and row["pass_s"] else 0
            rest = {k: v for k, v in row.items() if not k.endswith(("_s", "_mb"))}
            print(
                f"{mode:<8} {row['parse_s']:8.1f} {row['pass_s']:8.1f} {rate:9,.0f} {row['cpu_s']:7.1f} "
                f"{row['peak_mb']:7.0f} {row.get('worker_peak_mb', 0):10.0f}  {json.dumps(rest)}"
            )
        cache = out / ".quality-cache.tsv"
        print(f"\nhash cache: {cache.stat().st_size / 1e6:.1f} MB beside the manifest")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
