"""The `runner` command line: its subcommands, options, help texts with examples, and value checks."""

from __future__ import annotations

import argparse
import math

from . import __version__
from .spec.items import Shard

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
        "  NANOBANANA_API_KEY=sk-... runner run jobs/demo.yaml --out out/demo-real   # not the --mock run's dir\n"
        "  runner run big.yaml --shard 2/8         # the third of 8 machines (K counts from 0)\n"
        "  runner run jobs/demo.yaml --mock --mock-latency 0.5 --mock-fault 429=0.1 --no-progress --status-every 5\n"
        "  runner run big.yaml --no-progress --notify-url https://hooks.slack.com/services/...\n"
        "  runner run batch.yaml --no-wait         # mode: batch: submit, exit; the same command later collects\n\n"
        + EXIT_HELP,
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
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="batch mode: submit and exit 0 (batches stay open on the server); a later `runner run` collects them",
    )
    run.add_argument(
        "--poll", type=_seconds, metavar="S", help="batch mode: seconds between status checks (overrides batch.poll_s)"
    )
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
        description="Summarise an output dir from its manifest(s): the items its spec asks for now (--all-records: every record).",
        epilog="examples:\n  runner report out/demo\n  runner report out/demo --html out/demo/gallery.html\n"
        "  runner report out/demo --json | jq .failures_by_kind",
    )
    rep.add_argument("out", metavar="OUT_DIR")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--html", metavar="FILE", help="also write a self-contained HTML gallery to FILE")
    rep.add_argument(
        "--all-records",
        action="store_true",
        help="count every record, also of items the output dir's spec no longer asks for (default: the spec's items)",
    )
    rep.add_argument(
        "--no-quality",
        action="store_true",
        help="counts only: do not read the images (no near duplicates or single-colour check; byte "
        "duplicates and shapes still come from the manifest). Fast on a big s3:// output dir",
    )
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
        description="Write the ok images of the items OUT_DIR's spec asks for as a dataset with a card (README.md): `imagefolder` "
        '(metadata.jsonl beside the images, for datasets.load_dataset("imagefolder", data_dir=...)) or '
        "`webdataset` (tar shards of KEY.<ext> + KEY.json). Labels, params and reference images are columns.",
        epilog="examples:\n  runner export out/demo\n"
        "  runner export out/demo --format webdataset --to dist/demo --shard-size 5000\n"
        "  runner export out/labelled-animals --exclude-duplicates --exclude-mismatched --where 'style=ink drawing' "
        "--to dist/ink",
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
    exp.add_argument(
        "--all-records",
        action="store_true",
        help="export every recorded item, also those the output dir's spec no longer asks for (default: the spec's items)",
    )
    exp.add_argument("--json", action="store_true", help="print what was written and skipped as JSON")

    cancel = sub.add_parser(
        "cancel",
        help="batch mode: cancel the batches still open on the server for an output dir",
        formatter_class=_formatter,
        description="Cancel every batch of OUT_DIR that is still open on Google's Batch API (the ledger in "
        "OUT_DIR/batches*.jsonl says which). Their items go back to the to-do list: a later `runner run` submits "
        "them again. A batch that already ended is left for `runner run` to collect. The key is read from "
        "$GEMINI_API_KEY and sent to Google's API; batches made elsewhere, or with another variable, need --base-url "
        "and --key-env (an output dir's ledger is data: it never chooses where a key goes). Exit 1 if a batch could "
        "not be cancelled.",
        epilog="examples:\n  runner cancel out/big\n  runner cancel out/big --mock   # batches of a --mock run\n"
        "  runner cancel out/big --base-url http://127.0.0.1:8765/v1beta --key-env MY_KEY",
    )
    cancel.add_argument("out", metavar="OUT_DIR")
    cancel.add_argument("--mock", action="store_true", help="the batches were made by a --mock run")
    cancel.add_argument(
        "--base-url", help="where the batches were created (needed unless it is Google's own API: the key goes there)"
    )
    cancel.add_argument(
        "--key-env", metavar="NAME", help="the variable holding the key (needed unless it is GEMINI_API_KEY)"
    )

    mock = sub.add_parser(
        "mock-server",
        help="serve the built-in mock gateway (for trying the tool and for tests)",
        formatter_class=_formatter,
        description="A local gateway that speaks the API, with latency and fault injection. Fault markers in a "
        "prompt force a fault: [fault:429], [fault:503x2] (first 2 tries), [fault:content_filter], ...",
        epilog="examples:\n  runner mock-server --port 8765\n"
        "  runner mock-server --latency 0.2 --fault 429=0.1 --fault drop=0.02 --rpm 60\n"
        "  NANOBANANA_API_KEY=any runner run jobs/demo.yaml --base-url http://127.0.0.1:8765/v1 --out out/demo-server",
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
        choices=["nanobanana", "openai-compatible", "gemini"],
        default="nanobanana",
        help="speak like the gateway (extra_body), like LiteLLM/OpenRouter (top-level image_config), or print "
        "Google's API (/v1beta, always served too) as the base URL",
    )
    mock.add_argument(
        "--answer-format", choices=["markdown", "images"], help="images in Markdown content or in message.images"
    )
    mock.add_argument("--seed", type=int, default=0, help="seed of the random faults (same seed, same faults)")
    mock.add_argument(
        "--batch-latency", type=float, default=2.0, metavar="S", help="Google's Batch API: seconds a batch takes"
    )
    mock.add_argument(
        "--batch-fault",
        action="append",
        default=[],
        metavar="KIND=P",
        help="Google's Batch API: failed, expired, create_drop, create_503, create_429, missing, truncate, duplicate",
    )
    mock.add_argument("--batch-max-open", type=int, default=100, metavar="N", help="open batches allowed (429 past it)")
    mock.add_argument("--batch-max-tokens", type=int, default=0, metavar="N", help="enqueued-token quota (0: none)")
    mock.add_argument("--state-dir", metavar="DIR", help="keep uploaded files and batches in DIR across restarts")
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
