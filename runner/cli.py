"""The `runner` command: parse arguments, call the library, print results. Nothing else."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cliargs import EXIT_INTERNAL, build_parser
from .errors import RunnerError, UsageError


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
        from .safety import clean_message

        where = write_details(e, f"runner {' '.join(map(str, argv or sys.argv[1:]))}")
        why = clean_message(f"{type(e).__name__}: {e}", None)
        for secret in secrets_in_env():
            why = clean_message(why, secret)
        print(f"runner: internal error (a bug): {why}; details in {where}", file=sys.stderr)
        return EXIT_INTERNAL


def _say(text: str) -> None:
    from .safety import printable

    print(printable(text), file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:

    from .engine.job import RunOptions, describe, run_job
    from .spec.checks import check_url
    from .spec.parse import load_spec

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
        notify_url=args.notify_url,
        on_finish=args.on_finish,
        rerun_command=_rerun_command(args),
        wait=not args.no_wait,
        poll_s=args.poll,
    )
    result = run_job(spec, options, log=_say)
    for line in describe(result, _rerun_command(args)):
        _say(line)
    return result.exit_code


def _rerun_command(args: argparse.Namespace) -> str:
    """The command that resumes this run, for the hint after a stop."""
    parts = ["runner", "run", args.job]
    if args.out:
        parts += ["--out", args.out]
    if args.shard:
        parts += ["--shard", f"{args.shard.index}/{args.shard.count}"]
    if args.base_url:  # without it the resumed run would go to the spec's gateway, perhaps a paid one
        parts += ["--base-url", args.base_url]
    if args.mock:  # a rehearsal resumes as the same rehearsal
        parts.append("--mock")
        parts += ["--mock-latency", str(args.mock_latency)] if args.mock_latency else []
        parts += [a for kv in args.mock_fault or [] for a in ("--mock-fault", kv)]
        parts += ["--mock-rpm", str(args.mock_rpm)] if args.mock_rpm else []
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
    from .engine.plan import estimate
    from .safety import printable
    from .spec.parse import load_spec

    spec = load_spec(args.job)
    est = estimate(spec, args.out, args.shard, args.concurrency)
    est["warnings"] = [printable(w) for w in est["warnings"]]
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(_estimate_text(est))
    return 0


def _estimate_text(est: dict[str, Any]) -> str:
    from .engine.progress import duration
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
    if est.get("input_shapes"):
        shapes = ", ".join(f"{ratio} x{n}" for ratio, n in est["input_shapes"].items())
        rows.append(
            f"aspect ratio: {sum(est['input_shapes'].values())} items send none and keep their first reference "
            f"image's shape ({shapes})"
        )
    latency = ", ".join(f"~{s:g}s an image for {m}" for m, s in est.get("assumed_latency_s", {}).items())
    rows.append(
        f"time: up to {duration(est['estimated_time_s'])} ({est['time_basis']}; often much sooner)"
        if est["mode"] == "batch"
        else f"time: about {duration(est['estimated_time_s'])} at concurrency {est['concurrency']}"
        + (f", {est['requests_per_minute']:g} requests/minute" if est["requests_per_minute"] else "")
        + f" (bound by {est['time_basis']}; assuming {latency}, the typical latency)"
    )
    if est["remaining"]:
        rows.append(
            "to finish sooner: raise requests_per_minute if your key allows more"
            if est["time_basis"] == "requests_per_minute"
            else "to finish sooner: run it interactively (without `mode: batch`), at twice the price"
            if est["mode"] == "batch"
            else "to finish sooner: raise concurrency (or --concurrency), within your key's rate limit"
        )
    if est.get("in_open_batches"):
        rows.append(
            f"of the remaining, {est['in_open_batches']} are in batches still open on the server "
            f"({usd(est['committed_usd'])} committed: submitted, not yet collected; `runner run` collects them)"
        )
    if est["spent_usd"]:
        rows.append(f"already spent in {est['output_dir']}: {usd(est['spent_usd'])}")
    rows.extend(f"warning: {w}" for w in est["warnings"])
    return "\n".join(rows)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report
    from .report.text import format_quality, format_text

    summary = report(
        args.out,
        near_threshold=args.near_threshold,
        html=args.html,
        all_records=args.all_records,
        images=not args.no_quality,
    )
    if "gallery" in summary:
        _say(f"gallery: {summary['gallery']['path']} ({summary['gallery']['images']} images)")
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_text(summary) + "\n" + format_quality(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import Filters, export_dataset
    from .safety import printable

    filters = Filters(args.exclude_duplicates, args.exclude_mismatched, Filters.parse_where(args.where))
    result = export_dataset(
        args.out, args.format, to=args.to, filters=filters, shard_size=args.shard_size, all_records=args.all_records
    )
    where = result.location
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in result.skipped.items())
    _say(f"wrote {result.written} items as {args.format} to {where}" + (f"; skipped: {skipped}" if skipped else ""))
    if result.older:
        _say(
            f"left out {result.older} older item{'s' if result.older != 1 else ''} whose records the spec no "
            "longer asks for (--all-records exports them too)"
        )
    elif result.records_note and not args.all_records:
        _say(f"note: {result.records_note}")
    for reason, ids in result.examples.items():
        _say(f"  {reason.replace('_', ' ')}: e.g. {', '.join(ids)}")
    for warning in result.warnings:
        _say(f"warning: {printable(warning)}")
    if args.format == "imagefolder":
        _say(f'load it: datasets.load_dataset("imagefolder", data_dir="{where}") (needs Pillow: pip install pillow)')
    else:
        _say(f'load it: datasets.load_dataset("webdataset", data_files="{where}/shard-*.tar")')
    return 0


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
        batch_latency_s=args.batch_latency,
        batch_faults=tuple(_fault_rates(args.batch_fault)),
        batch_max_open=args.batch_max_open,
        batch_max_tokens=args.batch_max_tokens,
        state_dir=Path(args.state_dir) if args.state_dir else None,
    )
    try:
        config.validate()
    except ValueError as e:
        raise UsageError(f"mock-server: {e}") from None
    serve(config)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from .backends.batch.cancel import cancel_batches

    done = cancel_batches(args.out, mock=args.mock, base_url=args.base_url, key_env=args.key_env)
    for line in done.lines:
        _say(line)
    return 1 if done.failed else 0


COMMANDS = {
    "cancel": cmd_cancel,
    "run": cmd_run,
    "estimate": cmd_estimate,
    "report": cmd_report,
    "export": cmd_export,
    "mock-server": cmd_mock_server,
}
