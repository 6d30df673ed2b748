"""`runner cancel OUT`: cancel the batches an output dir's ledger says are still open on Google's Batch API.

It only talks to the server: the run that owns the output dir (waiting, or the next one) sees the
batches CANCELLED when it polls and writes that down itself, so cancel needs no lock and can run
beside a waiting run. Cancelled items go back to the to-do list.
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from ...engine.progress import plural
from ...errors import UsageError
from ...output import is_remote, open_view
from ...output.ledger import BatchEntry
from ...safety import printable
from ...spec.parse import GEMINI_BASE_URL, GEMINI_KEY_ENV, is_google
from .api import ApiError, GoogleBatchApi, Unknown, error_text


@dataclass
class Cancelled:
    """What `runner cancel` did: a line a batch, and how many it could not cancel (exit 1 if any)."""

    lines: list[str] = field(default_factory=list)
    failed: int = 0


def cancel_batches(
    out: str | Path, *, mock: bool = False, base_url: str | None = None, key_env: str | None = None
) -> Cancelled:
    """Cancel the open batches of `out` (a batch that already ended is left for `runner run` to collect).

    The output dir says where its batches were created and which variable held the key, but an
    output dir is data (a bucket many can write): the key is read from a variable and sent to a
    host the ledger names only when it is Google's own and GEMINI_API_KEY, else when `base_url` /
    `key_env` say so."""
    return anyio.run(_cancel, out, mock, base_url, key_env)


def _where(entries: list[BatchEntry], base_url: str | None, key_env: str | None) -> tuple[str, str]:
    """(base URL, key variable) to cancel with: given, or the ledger's where it is Google's own."""
    bases = {e.base_url for e in entries if e.base_url}
    envs = {e.key_env for e in entries if e.key_env}
    if base_url is None:
        if len(bases) > 1:
            raise UsageError(
                f"the open batches were created at several base URLs ({', '.join(sorted(bases))}): give --base-url"
            )
        base_url = bases.pop() if bases else GEMINI_BASE_URL
        if not is_google(base_url):
            raise UsageError(
                f"the open batches were created at {base_url} (the output dir's ledger says so): give --base-url "
                f"{base_url} to send the key there"
            )
    if key_env is None:
        named = envs.pop() if len(envs) == 1 else GEMINI_KEY_ENV
        if named != GEMINI_KEY_ENV:
            raise UsageError(
                f"the open batches were created with the key in ${named} (the output dir's ledger says so): give "
                f"--key-env {named} to send it"
            )
        key_env = named
    return base_url, key_env


async def _cancel(out: str | Path, mock: bool, base_url: str | None, key_env: str | None) -> Cancelled:
    with open_view(out) as view:
        entries = view.ledger().open_batches()
    if not entries:
        return Cancelled([f"no open batches in {out}"])
    async with AsyncExitStack() as stack:
        if mock:
            from ...mock import MockConfig, MockGateway

            state = None if is_remote(out) else Path(out) / ".mock-google"
            gateway = stack.enter_context(MockGateway(MockConfig(flavor="gemini", state_dir=state)))
            base, key = gateway.base_url, "mock-key"
        else:
            base, key_env = _where(entries, base_url, key_env)
            key = os.environ.get(key_env, "").strip()
            if not key:
                raise UsageError(f"no API key: set {key_env}")
        api = GoogleBatchApi(base, key)
        stack.push_async_callback(api.aclose)
        done = Cancelled()
        unnamed = {e.display_name: e for e in entries if e.name is None}
        found: dict[str, str] = {}
        unlisted = ""  # why the unnamed ones could not be looked up
        if unnamed:  # prepared by a run that stopped before it heard back: look them up by display name
            try:
                async for info in api.list():
                    if info.display_name in unnamed and not info.done:
                        found[info.display_name] = info.name
            except (ApiError, Unknown) as e:
                unlisted = error_text(e)
        for entry in entries:
            name = entry.name or found.get(entry.display_name)
            if name is None and unlisted:
                done.failed += 1
                done.lines.append(f"{entry.display_name}: could not look it up on the server: {unlisted}")
                continue
            if name is None:
                done.lines.append(f"{entry.display_name}: not on the server (never created); nothing to cancel")
                continue
            try:
                info = await api.get(name)  # an ended batch has results paid for: collect them, never drop them
                if info.done:
                    done.lines.append(
                        f"{name}: already ended {info.state}; nothing to cancel (`runner run` collects it)"
                    )
                    continue
                await api.cancel(name)
            except (ApiError, Unknown) as e:
                done.failed += 1
                done.lines.append(f"{name}: could not cancel it: {error_text(e)}")
                continue
            done.lines.append(f"{name}: cancelled ({plural(len(entry.items), 'item')} back to the to-do list)")
        done.lines = [printable(line) for line in done.lines]
        return done
