"""The `runner` command: parse arguments, call the library, print results. Nothing else."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RunnerError, UsageError
from .items import Shard

EXIT_HELP = """exit status: 0 every item ok; 1 some items failed (now or before); 2 bad spec
or usage (no key set included: nothing was sent); 3 run aborted (bad key, no balance,
budget reached, too many consecutive failures, output dir locked, unwritable or full);
130 interrupted; 70 internal error (a bug: details written to a file it names)."""
EXIT_INTERNAL = 70


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runner",
        formatter_class=_formatter,
        description="Turn a YAML job spec into an image dataset through the Nano Banana gateway.",
        epilog="example:\n  runner run jobs/demo.yaml --mock\n  runner estimate jobs/demo.yaml\n\n" + EXIT_HELP,
    )
    p.add_argument("--version", action="version", version=f"runner {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run every item not yet done (a rerun resumes)",
        formatter_class=_formatter,
        description="Run every item of JOB that is not yet done in the output dir. Rerunning resumes: done "
        "items are skipped and never paid for twice. Ctrl+C stops new items and lets those in flight finish.",
        epilog="examples:\n  runner run jobs/demo.yaml --mock          # try it: built-in gateway, no key\n"
        "  NANOBANANA_API_KEY=sk-... runner run jobs/demo.yaml --out out/demo\n"
        "  runner run big.yaml --shard 2/8         # the third of 8 machines (K counts from 0)\n"
        "  runner run jobs/demo.yaml --mock --mock-latency 0.5 --mock-fault 429=0.1 --no-progress --status-every 5\n"
        "  runner run big.yaml --no-progress --notify-url https://hooks.slack.com/services/...\n\n" + EXIT_HELP,
    )
    run.add_argument("job", metavar="JOB.yaml")
    _common(run)
    run.add_argument("--base-url", help="gateway URL (overrides base_url in the spec)")
    run.add_argument("--concurrency", type=_positive_int, help="requests in flight at most (overrides the spec)")
    run.add_argument("--retry-failed", action="store_true", help="also retry items that failed permanently before")
    run.add_argument("--no-progress", action="store_true", help="no progress bar: status lines instead (for logs)")
    run.add_argument(
        "--status-every",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="without a bar (--no-progress, or stderr not a terminal): a status line every S seconds (default: 60; 0: none)",
    )
    run.add_argument("--mock", action="store_true", help="run against the built-in mock gateway on loopback; no key")
    run.add_argument("--mock-latency", type=_seconds, default=0.0, metavar="S", help="with --mock: seconds per answer")
    run.add_argument(
        "--mock-fault",
        action="append",
        default=[],
        metavar="KIND=P",
        help="with --mock: inject KIND with probability P",
    )
    run.add_argument("--mock-rpm", type=int, default=0, metavar="N", help="with --mock: enforce N requests per minute")
    run.add_argument(
        "--max-cost", type=_money, metavar="USD", help="budget for the output dir (overrides max_cost_usd)"
    )
    run.add_argument(
        "--notify-url", metavar="URL", help="POST the summary as JSON (Slack-style `text`) when the run ends"
    )
    run.add_argument(
        "--on-finish", metavar="CMD", help="run CMD when the run ends (summary JSON on stdin, RUNNER_* variables)"
    )
    run.add_argument("--verify", action="store_true", help="hash every done image on resume, not just size+mtime")
    run.add_argument("--no-fsync", action="store_true", help="skip fsync (faster; a power cut may lose recent items)")
    run.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="after Ctrl+C, seconds to let requests finish (default: 30)",
    )
    run.add_argument("--dry-run", action="store_true", help="estimate only, like `runner estimate`")
    run.add_argument("--json", action="store_true", help=argparse.SUPPRESS)

    est = sub.add_parser(
        "estimate",
        help="dry run: count items, cost and time; sends nothing, needs no key",
        formatter_class=_formatter,
        description="Count the items of JOB, how many are already done in the output dir, what the rest "
        "will cost and roughly how long they take. Sends nothing and needs no key.",
        epilog="examples:\n  runner estimate jobs/demo.yaml\n  runner estimate jobs/demo.yaml --json | jq .estimated_cost_usd",
    )
    est.add_argument("job", metavar="JOB.yaml")
    _common(est)
    est.add_argument("--concurrency", type=_positive_int, help="concurrency to assume (default: the spec's)")
    est.add_argument("--json", action="store_true", help="print one JSON object")

    rep = sub.add_parser(
        "report",
        help="what a run produced: counts, failures, cost, latency",
        formatter_class=_formatter,
        description="Summarise an output dir from its manifest(s).",
        epilog="examples:\n  runner report out/demo\n  runner report out/demo --html out/demo/gallery.html\n"
        "  runner report out/demo --json | jq .failures_by_kind",
    )
    rep.add_argument("out", metavar="OUT_DIR")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery to FILE")
    rep.add_argument(
        "--near-threshold",
        type=int,
        default=4,
        metavar="BITS",
        help="near duplicates: perceptual hashes this many bits apart or less (0-32, default: 4; needs Pillow)",
    )

    exp = sub.add_parser(
        "export",
        help="deliver the dataset: Hugging Face imagefolder metadata or WebDataset shards, with a dataset card",
        formatter_class=_formatter,
        description="Write the ok images of OUT_DIR as a dataset with a card (README.md): `imagefolder` "
        '(metadata.jsonl beside the images, for datasets.load_dataset("imagefolder", data_dir=...)) or '
        "`webdataset` (tar shards of KEY.<ext> + KEY.json). Labels, params and reference images are columns.",
        epilog="examples:\n  runner export out/demo\n"
        "  runner export out/demo --format webdataset --to dist/demo --shard-size 5000\n"
        "  runner export out/demo --exclude-duplicates --exclude-mismatched --where style=ink",
    )
    exp.add_argument("out", metavar="OUT_DIR")
    exp.add_argument("--format", choices=["imagefolder", "webdataset"], default="imagefolder")
    exp.add_argument(
        "--to", metavar="DIR", help="write here (default: OUT_DIR for imagefolder, OUT_DIR/webdataset for shards)"
    )
    exp.add_argument(
        "--shard-size", type=_positive_int, default=1000, metavar="N", help="samples per tar shard (default: 1000)"
    )
    exp.add_argument("--exclude-duplicates", action="store_true", help="keep one item of each byte-identical group")
    exp.add_argument("--exclude-mismatched", action="store_true", help="leave out images of the wrong aspect ratio")
    exp.add_argument("--where", action="append", default=[], metavar="VAR=VALUE", help="only items with this label")
    exp.add_argument("--json", action="store_true", help="print what was written and skipped as JSON")

    mock = sub.add_parser(
        "mock-server",
        help="serve the built-in mock gateway (for trying the tool and for tests)",
        formatter_class=_formatter,
        description="A local gateway that speaks the API, with latency and fault injection. Fault markers in a "
        "prompt force a fault: [fault:429], [fault:503x2] (first 2 tries), [fault:content_filter], ...",
        epilog="examples:\n  runner mock-server --port 8765\n"
        "  runner mock-server --latency 0.2 --fault 429=0.1 --fault drop=0.02 --rpm 60\n"
        "  NANOBANANA_API_KEY=any runner run jobs/demo.yaml --base-url http://127.0.0.1:8765/v1",
    )
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    mock.add_argument("--port", type=int, default=8765, help="port to listen on (default: 8765; 0: a free one)")
    mock.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    mock.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds before each answer")
    mock.add_argument("--jitter", type=float, default=0.0, metavar="S", help="extra random latency, up to S")
    mock.add_argument("--scale", type=int, default=8, help="images are the real pixel size divided by this")
    mock.add_argument(
        "--mime", default="png", choices=["png", "jpeg", "webp"], help="image type (jpeg, webp need Pillow)"
    )
    mock.add_argument("--pad-bytes", type=int, default=0, help="make each image this much bigger")
    mock.add_argument("--rpm", type=int, default=0, help="enforce this many requests per minute (0: none)")
    mock.add_argument(
        "--rpm-window", type=float, default=10.0, metavar="S", help="window the rpm limit is enforced over"
    )
    mock.add_argument(
        "--retry-after",
        default="header",
        choices=["header", "body", "both", "none"],
        help="how 429s say how long to wait: Retry-After header, Google retryDelay in the body, both, none",
    )
    mock.add_argument("--fault", action="append", default=[], metavar="KIND=P", help="inject KIND with probability P")
    mock.add_argument(
        "--flavor",
        choices=["nanobanana", "openai-compatible"],
        default="nanobanana",
        help="speak like the gateway (extra_body) or like LiteLLM/OpenRouter (top-level image_config)",
    )
    mock.add_argument(
        "--answer-format", choices=["markdown", "images"], help="images in Markdown content or in message.images"
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of the random faults (same seed, same faults)")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output dir or fsspec URL such as s3://bucket/x (overrides output_dir)")
    p.add_argument("--shard", type=Shard.parse, metavar="K/N", help="only the K-th of N slices of the items (0-based)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("expected a finite number of seconds, at least 0")
    return value


def _money(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected dollars, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("expected a finite amount of dollars, more than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:  # from a type= converter such as --shard
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(COMMANDS[args.command](args))
    except RunnerError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `runner report ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: never exit 1, which scripts read as "some items failed"
        if os.environ.get("RUNNER_DEBUG"):
            raise
        from .errors import secrets_in_env, write_details
        from .policy import clean_message

        where = write_details(e, f"runner {' '.join(map(str, argv or sys.argv[1:]))}")
        why = clean_message(f"{type(e).__name__}: {e}", None)
        for secret in secrets_in_env():
            why = clean_message(why, secret)
        print(f"runner: internal error (a bug): {why}; details in {where}", file=sys.stderr)
        return EXIT_INTERNAL


def _say(text: str) -> None:
    from .policy import printable

    print(printable(text), file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from .checks import check_url
    from .job import RunOptions, describe, run_job, summary_dict
    from .notify import notify
    from .spec import load_spec

    if args.dry_run:
        return cmd_estimate(args)
    for flag, url in (("--base-url", args.base_url), ("--notify-url", args.notify_url)):
        if url is not None and (problem := check_url(url.rstrip("/"))) is not None:
            raise UsageError(f"{flag}: {problem}")
    spec = load_spec(args.job)
    for warning in spec.warnings:
        _say(f"warning: {warning}")
    options = RunOptions(
        out=args.out,
        base_url=args.base_url.rstrip("/") if args.base_url else None,
        concurrency=args.concurrency,
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        status_every=args.status_every,
        mock=args.mock,
        mock_config=_mock_config(args) if args.mock else None,
        shard=args.shard,
        max_cost_usd=args.max_cost,
        verify=args.verify,
        durable=not args.no_fsync,
        grace_s=args.grace,
        handle_signals=True,
    )
    result = run_job(spec, options, log=_say)
    lines = describe(result, _rerun_command(args))
    for line in lines:
        _say(line)
    url, on_finish = args.notify_url or spec.notify_url, args.on_finish or spec.on_finish
    if url or on_finish:
        anyio.run(
            lambda: notify(
                summary_dict(result), lines[0], url=url, command=on_finish, key_env=spec.api_key_env, log=_say
            )
        )
    return result.exit_code


def _rerun_command(args: argparse.Namespace) -> str:
    """The command that resumes this run, for the hint after a stop."""
    parts = ["runner", "run", args.job]
    if args.out:
        parts += ["--out", args.out]
    if args.shard:
        parts += ["--shard", f"{args.shard.index}/{args.shard.count}"]
    if args.mock:
        parts.append("--mock")
    return shlex.join(parts)


def _mock_config(args: argparse.Namespace) -> object:
    from .mock import MockConfig

    config = MockConfig(
        latency_s=args.mock_latency,
        rpm_limit=args.mock_rpm,
        fault_rates=tuple(_fault_rates(args.mock_fault)),
        image_scale=1,  # real pixel sizes: a rehearsal's report and gallery look like the real thing
    )
    try:
        config.validate()
    except ValueError as e:
        raise UsageError(f"--mock: {e}") from None
    return config


def _fault_rates(specs: list[str]) -> list[tuple[str, float]]:
    rates = []
    for f in specs:
        kind, _, p = f.partition("=")
        try:
            rates.append((kind, float(p)))
        except ValueError:
            raise UsageError(f"--fault: expected KIND=PROBABILITY such as 429=0.1, got {f!r}") from None
    return rates


def cmd_estimate(args: argparse.Namespace) -> int:
    from .plan import estimate
    from .policy import printable
    from .spec import load_spec

    spec = load_spec(args.job)
    est = estimate(spec, args.out, args.shard, args.concurrency)
    est["warnings"] = [printable(w) for w in est["warnings"]]
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(_estimate_text(est))
    return 0


def _estimate_text(est: dict[str, Any]) -> str:
    from .pricing import usd

    rows = [f"{'model':<16}{'size':>6}{'items':>10}{'done':>10}{'remaining':>11}{'$/image':>10}{'cost $':>12}"]
    for r in est["by_model"]:
        rows.append(
            f"{r['model']:<16}{r['image_size']:>6}{r['count']:>10}{r['done']:>10}{r['remaining']:>11}"
            f"{r['price_usd']:>10.3f}{usd(r['cost_usd']):>12}"
        )
    rows.append(
        f"{'total':<22}{est['items']:>10}{est['done']:>10}{est['remaining']:>11}{'':>10}{usd(est['estimated_cost_usd']):>12}"
    )
    if est["input_images"]:
        rows.append(
            f"reference images: {est['input_images']} sent ({_size(est['input_bytes'])}), billed as input "
            f"tokens: about {usd(est['estimated_input_cost_usd'])} more (pricing: MODEL: {{input_image: USD}})"
        )
    rows.append(
        f"time: about {_duration(est['estimated_time_s'])} at concurrency {est['concurrency']}"
        + (f", {est['requests_per_minute']:g} requests/minute" if est["requests_per_minute"] else "")
        + f" (bound by {est['time_basis']})"
    )
    if est["spent_usd"]:
        rows.append(f"already spent in {est['output_dir']}: {usd(est['spent_usd'])}")
    rows.extend(f"warning: {w}" for w in est["warnings"])
    return "\n".join(rows)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_report(args: argparse.Namespace) -> int:
    from .output import is_remote, open_view
    from .quality import analyze
    from .report import format_quality, format_text, read_manifests, summarize

    remote = is_remote(args.out)
    if args.html and remote:
        raise UsageError("--html needs a local output dir: the gallery links to the image files")
    with open_view(args.out) as (local, source):
        manifests = read_manifests(local)
        summary = summarize(manifests)
        try:
            cache = None if remote else local / ".quality-cache.tsv"
            quality = analyze(manifests.latest.values(), source, near_threshold=args.near_threshold, cache_path=cache)
        except ValueError as e:
            raise UsageError(f"--near-threshold: {e}") from None
    summary["output_dir"] = str(args.out)
    summary.update(quality)
    if args.html:
        from .gallery import write_html

        title = summary.get("name") or Path(args.out).name
        records = list(manifests.latest.values())
        shown = write_html(Path(args.html), Path(args.out), records, summary, title=title, quality=quality)
        _say(f"gallery: {args.html} ({shown} images)")
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_text(summary) + "\n" + format_quality(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from .export import Filters, export_imagefolder, export_webdataset
    from .output import is_remote, open_view
    from .output.remote import upload_dir
    from .policy import printable
    from .report import read_manifests, summarize

    filters = Filters(args.exclude_duplicates, args.exclude_mismatched, Filters.parse_where(args.where))
    remote = is_remote(args.out)
    sub = "" if args.format == "imagefolder" else "webdataset"
    with open_view(args.out) as (local, source), tempfile.TemporaryDirectory(prefix="runner-export-") as tmp:
        manifests = read_manifests(local)
        summary = summarize(manifests)
        if args.to:
            dest = Path(args.to)
        elif remote:
            dest = Path(tmp)  # written here, then uploaded into the remote output dir
        else:
            dest = Path(args.out) / sub if sub else Path(args.out)
            if sub:  # inside the output dir: a link planted there must not send shards elsewhere
                _real_folder(Path(args.out), sub)
        records = list(manifests.latest.values())
        if args.format == "imagefolder":
            # In the output dir itself the images are where they belong: nothing to place.
            in_place = (remote and not args.to) or dest.resolve() == Path(args.out).resolve()
            result = export_imagefolder(
                records, source, dest, filters=filters, summary=summary, copy_files=not in_place
            )
        else:
            result = export_webdataset(
                records, source, dest, shard_size=args.shard_size, filters=filters, summary=summary
            )
        where = str(dest)
        if remote and not args.to:
            where = upload_dir(str(args.out), dest, sub)
    if args.json:
        print(json.dumps({**result.as_dict(), "dest": where}, indent=2))
        return 0
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in result.skipped.items())
    _say(f"wrote {result.written} items as {args.format} to {where}" + (f"; skipped: {skipped}" if skipped else ""))
    for reason, ids in result.examples.items():
        _say(f"  {reason.replace('_', ' ')}: e.g. {', '.join(ids)}")
    for warning in result.warnings:
        _say(f"warning: {printable(warning)}")
    if args.format == "imagefolder":
        _say(f'load it: datasets.load_dataset("imagefolder", data_dir="{where}") (needs Pillow: pip install pillow)')
    else:
        _say(f'load it: datasets.load_dataset("webdataset", data_files="{where}/shard-*.tar")')
    return 0


def _real_folder(out: Path, name: str) -> None:
    from .output.files import Jail, output_error

    jail = Jail(out)
    try:
        jail.dir_fd(name, create=True)
    except OSError as e:
        raise output_error(e, str(out)) from None
    finally:
        jail.close()


def cmd_mock_server(args: argparse.Namespace) -> int:
    from .mock import MockConfig, serve

    rates = _fault_rates(args.fault)
    config = MockConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        latency_s=args.latency,
        latency_jitter_s=args.jitter,
        image_scale=args.scale,
        mime=args.mime,
        pad_bytes=args.pad_bytes,
        rpm_limit=args.rpm,
        rpm_window_s=args.rpm_window,
        retry_after=args.retry_after,
        fault_rates=tuple(rates),
        seed=args.seed,
        flavor=args.flavor,
        answer_format=args.answer_format,
    )
    try:
        config.validate()
    except ValueError as e:
        raise UsageError(f"mock-server: {e}") from None
    serve(config)
    return 0


COMMANDS = {
    "run": cmd_run,
    "estimate": cmd_estimate,
    "report": cmd_report,
    "export": cmd_export,
    "mock-server": cmd_mock_server,
}
