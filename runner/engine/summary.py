"""What a run says when it ends: the summary a person reads, the next steps, and the JSON a webhook gets."""

from __future__ import annotations

import os
import shlex
import time
from typing import TYPE_CHECKING, Any

from ..policy import PERMANENT
from ..pricing import usd
from ..safety import printable
from ..spec.parse import GEMINI_KEY_ENV, is_google
from .progress import duration, plural

if TYPE_CHECKING:
    from .job import RunResult


def summary_dict(result: RunResult) -> dict[str, Any]:
    """The run's outcome as JSON (for --notify-url and --on-finish): no key, no prompts."""
    s = result.stats
    return {
        "name": result.name, "output_dir": absolute(result.out_dir), "exit_code": result.exit_code, "items": result.items,
        "skipped_done": result.skipped_done, "skipped_failed": result.skipped_failed, "ok": s.ok,
        "failed": s.failed, "interrupted": s.interrupted, "recovered": s.recovered, "retries": s.retries,
        "retries_by_kind": dict(s.retries_by_kind), "requests": s.requests, "failures_by_kind": dict(s.failures_by_kind),
        "spent_usd": round(s.spent_usd, 6), "total_spent_usd": round(result.total_spent_usd, 6),
        "adopted_usd": round(s.adopted_usd, 6), "unsaved": s.unsaved, "unsaved_usd": round(s.unsaved_usd, 6),
        "unrecorded": s.unrecorded, "stop_reason": s.stop_reason,
    }  # fmt: skip


def absolute(out_dir: str) -> str:
    """The output dir as an absolute path (a URL as it is): a webhook's reader is elsewhere."""
    return out_dir if "://" in out_dir else os.path.abspath(out_dir)


def describe(result: RunResult, command: str = "runner run JOB.yaml", *, absolute_path: bool = False) -> list[str]:
    """The closing summary a person reads, and what to do next (`absolute_path`: for a notification)."""
    s = result.stats
    name = f"{result.name}: " if result.name else ""
    out = absolute(result.out_dir) if absolute_path else result.out_dir
    lines = [
        f"{name}{s.ok} ok, {s.failed} failed, {s.retries} retries, {s.requests} requests, "
        f"{usd(s.spent_usd)} spent this run ({usd(result.total_spent_usd)} in all) "
        f"in {duration(time.monotonic() - s.started)} -> {out}"
    ]
    if s.retries_by_kind:
        lines.append("retried: " + ", ".join(f"{k}={v}" for k, v in sorted(s.retries_by_kind.items())))
    if s.failures_by_kind:
        lines.append("failures: " + ", ".join(f"{k}={v}" for k, v in sorted(s.failures_by_kind.items())))
    if s.recovered:
        lines.append(
            f"{s.recovered} items recovered from whole images on disk (not bought again; "
            f"{usd(s.adopted_usd)} spent by the run that made them)"
        )
    if s.unsaved:
        lines.append(
            f"{s.unsaved} answers paid but not saved: {s.output_problem} ({usd(s.unsaved_usd)}, counted in the spend; "
            + (
                "their batches' results stay on the server: a rerun downloads them again)"
                if result.batch
                else "a rerun buys them again)"
            )
        )
    if s.unrecorded:
        lines.append(
            f"{s.unrecorded} images saved but not recorded: {s.output_problem} (the next run adopts them, "
            "never buys them again)"
        )
    if s.stop_kind == "budget":
        lines.append(
            f"stopped: budget reached: {usd(result.total_spent_usd)} spent of max_cost_usd {result.max_cost_usd:g}"
        )
    elif s.stop_reason and s.stop_kind != "interrupt":
        lines.append(f"stopped: {printable(s.stop_reason)}")
    lines += [f"next: {hint}" for hint in _next_steps(result, command)]
    return lines


def _cancel_flags(result: RunResult) -> str:
    """What `runner cancel` must be told: where the batches are, and the key's variable, unless Google's defaults."""
    flags = []
    if not is_google(result.base_url):
        flags += ["--base-url", result.base_url]
    if result.key_env != GEMINI_KEY_ENV:
        flags += ["--key-env", result.key_env]
    return "".join(f" {shlex.quote(f)}" for f in flags)


def _next_steps(result: RunResult, command: str) -> list[str]:
    s = result.stats
    if s.open_batches:
        out = shlex.quote(result.out_dir)
        cancel = f"runner cancel {out}" + (" --mock" if result.mock else _cancel_flags(result))
        return [
            f"{plural(s.open_batches, 'batch', 'batches')} {'stays' if s.open_batches == 1 else 'stay'} open on Google's Batch API (results within 24 h): "
            f"`{command}` collects them and submits what is left; `runner report {out}` shows them; `{cancel}` "
            "cancels them"
        ]
    if s.signalled:
        if s.done >= s.total and not s.failed and not s.interrupted:
            return ["interrupted, but every item had finished: nothing is left to run"]
        cut = f"; {s.interrupted} cut short in a retry wait" if s.interrupted else ""
        return [
            f"interrupted: the requests in flight were recorded{cut}; rerun the same command to resume "
            f"(`{command}`): done items are skipped and never paid for twice"
        ]
    if s.stop_kind == "budget":
        return [
            f"raise max_cost_usd in the spec or pass --max-cost (more than {result.max_cost_usd:g}), then `{command}` goes on"
        ]
    if s.stop_kind == "abort":
        hint = {
            "auth": f"check the key in ${result.key_env}: the gateway refused it",
            "no_balance": f"top up the balance of the key in ${result.key_env}",
            "forbidden": f"the key in ${result.key_env} may not use this model: check `model` or the key",
            "not_found": "check base_url (or --base-url): the gateway answered 404 or redirected",
            "output": f"make room (or fix what the message says) in {result.out_dir}",
            "certificate": "trust the gateway's CA: SSL_CERT_FILE=/path/to/ca.pem (or SSL_CERT_DIR, or "
            "REQUESTS_CA_BUNDLE), never by turning verification off",
        }.get(s.stop_failure or "", "see the reason above")
        return [f"{hint}; then `{command}` resumes"]
    if s.stop_kind == "breaker":  # what failed says whether waiting can cure it
        hint = {
            "bad_request": "the gateway refused the requests themselves, and waiting will not change that: check "
            "api_format (this gateway may speak another one, e.g. openai-compatible), params and the model",
            "invalid_response": "the gateway's answers could not be read: check base_url and api_format",
        }.get(s.stop_failure or "", "the service kept failing: wait a while")
        return [f"{hint}, then `{command}` resumes"]
    hints = []
    kinds = {k: n for k, n in sorted(s.failures_by_kind.items()) if k in PERMANENT}
    permanent = sum(kinds.values()) + result.skipped_failed
    retryable = s.failed - sum(kinds.values()) + s.interrupted
    if retryable:
        hints.append(f"{plural(retryable, 'item')} failed with errors a retry may cure: `{command}` tries them again")
    if permanent:
        why = [f"{k} {n}" for k, n in kinds.items()]
        why += [f"{result.skipped_failed} before, skipped"] if result.skipped_failed else []
        hints.append(
            f"{plural(permanent, 'item')} failed permanently ({', '.join(why)}): `{command} --retry-failed` tries them again"
            + (
                " (a bad_request is the request itself: a retry alone will not cure it)"
                if "bad_request" in kinds
                else ""
            )
        )
    if retryable or permanent:
        hints.append(f"which items failed and why: `runner report {shlex.quote(result.out_dir)}`")
    return hints
