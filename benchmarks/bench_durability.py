"""What the fsyncs cost: the same runner run with durable=True (the default) and durable=False
(`--no-fsync`), against the mock gateway (its own process) at zero latency, where the cost shows
most.

durable=True writes each image to a temp file, fsyncs it, renames it and fsyncs its folder,
and fsyncs each batch of manifest lines; durable=False does the same writes without fsyncs.
Runs alternate (True, False, True, ...) and the median of --repeat is shown, for a small image
and for a padded ~1 MB one. A last table times the bare syscalls in one thread (write + fsync
+ rename + fsync folder, per image), the floor of what durability costs on this disk.

    python benchmarks/bench_durability.py
    python benchmarks/bench_durability.py --requests 1000 --concurrency 16 --pad-mb 0 --pad-mb 1
    python benchmarks/bench_durability.py --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from common import (
    TRANSPORTS,
    bodies,
    load_spec,
    machine,
    median,
    mock_server,
    run_aiohttp_loop,
    run_runner,
    save_file,
    scratch,
    split_items,
    table,
    write_prompts,
    write_spec,
)


def raw_fsync_ms(folder: Path, size: int, count: int) -> tuple[float, float]:
    """Milliseconds per image for write+rename without and with the fsyncs, single-threaded."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    results = []
    for durable in (False, True):
        t0 = time.perf_counter()
        for i in range(count):
            save_file(str(folder), f"{i}.png", data, durable)
        results.append((time.perf_counter() - t0) / count * 1e3)
        for p in folder.iterdir():
            p.unlink()
    return results[0], results[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--pad-mb", type=float, action="append", help="image padding in MB (repeatable; default 0 and 1)")
    ap.add_argument("--transport", choices=TRANSPORTS, default="aiohttp")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="200 requests, one repeat")
    args = ap.parse_args()
    n = 200 if args.quick else args.requests
    repeat = 1 if args.quick else args.repeat
    pads = args.pad_mb if args.pad_mb is not None else [0.0, 1.0]
    conc = args.concurrency
    print(f"bench_durability: {machine()}; runner/{args.transport}, {n} requests, concurrency {conc}, latency 0")
    work = scratch("durability")
    rows, raw_rows = [], []
    try:
        for pad_mb in pads:
            pad = int(pad_mb * 1e6)
            d = work / f"pad{pad_mb:g}"
            d.mkdir()
            with mock_server(pad_bytes=pad) as mock:
                distinct, repeats = split_items(n, 1000 if pad < 100_000 else 100)  # the mock caches 256 MB of images
                prompts = write_prompts(d / "prompts.txt", distinct)
                spec = load_spec(
                    write_spec(d, distinct, mock.base_url, concurrency=conc, prompts=prompts, repeats=repeats)
                )
                run_aiohttp_loop(mock.base_url, bodies(spec)[:distinct], conc)  # every image into the mock's cache
                times: dict[bool, list[float]] = {True: [], False: []}
                image_bytes = 0
                for r in range(repeat):
                    for durable in (True, False):
                        out = d / f"out-{durable}-{r}"
                        t = run_runner(
                            spec, out, mock.base_url, transport=args.transport, concurrency=conc, durable=durable
                        )
                        if not image_bytes:
                            image_bytes = sum(p.stat().st_size for p in (out / "images").rglob("*.png")) // n
                        shutil.rmtree(out, ignore_errors=True)
                        times[durable].append(t.seconds)
            on, off = median(times[True]), median(times[False])
            for durable, secs in ((True, on), (False, off)):
                rows.append([f"{image_bytes / 1e3:.0f} KB", durable, secs, f"{n / secs:.0f}", f"{secs / n * 1e3:.2f}"])
            rows.append([f"{image_bytes / 1e3:.0f} KB", "difference", on - off, "", f"{(on - off) / n * 1e3:+.2f}"])
            plain, synced = raw_fsync_ms(work / "raw", max(image_bytes, 1), 100 if args.quick else 300)
            raw_rows.append([f"{image_bytes / 1e3:.0f} KB", f"{plain:.3f}", f"{synced:.3f}", f"{synced - plain:+.3f}"])
        table(
            ["image", "durable", "seconds", "images/s", "ms per image"],
            rows,
            f"runner run, median of {repeat} (ms per image = wall time / images, {conc} in flight)",
        )
        table(
            ["image", "write+rename ms", "with fsync file + folder ms", "fsync cost ms"],
            raw_rows,
            "the bare syscalls, one thread, per image (no concurrency: the worst case per image)",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
