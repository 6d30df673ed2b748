"""Tell someone a long run ended: POST the summary to a webhook and/or run a command; never fail the run on it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

import anyio
import httpx

WEBHOOK_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0


async def notify(
    summary: dict[str, Any],
    text: str,
    *,
    url: str | None,
    command: str | None,
    key_env: str,
    log: Callable[[str], None],
) -> None:
    """Send `summary` (no key in it) to `url` as JSON with a Slack-style `text`, and/or run `command`
    with the summary on stdin and in RUNNER_* variables, the key's variable removed from its
    environment. Failures are logged, never raised; both are bounded in time."""
    if url:
        try:
            with anyio.fail_after(WEBHOOK_TIMEOUT_S):
                async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S, follow_redirects=False) as http:
                    resp = await http.post(url, json={"text": text, "runner": summary})
            if resp.status_code >= 300:
                log(f"notify: the webhook answered HTTP {resp.status_code}")
        except (TimeoutError, httpx.HTTPError, OSError) as e:
            log(f"notify: could not reach the webhook ({type(e).__name__})")
    if command:
        env = {k: v for k, v in os.environ.items() if k != key_env}
        env.update(
            RUNNER_EXIT_CODE=str(summary.get("exit_code", "")),
            RUNNER_OUTPUT_DIR=str(summary.get("output_dir", "")),
            RUNNER_OK=str(summary.get("ok", "")),
            RUNNER_FAILED=str(summary.get("failed", "")),
            RUNNER_SUMMARY=text,
        )
        try:
            with anyio.move_on_after(COMMAND_TIMEOUT_S) as scope:
                done = await anyio.run_process(
                    ["/bin/sh", "-c", command],
                    input=json.dumps(summary).encode(),
                    env=env,
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if scope.cancelled_caught:
                log(f"notify: --on-finish did not finish within {COMMAND_TIMEOUT_S:g}s; stopped it")
            elif done.returncode:
                log(f"notify: --on-finish exited {done.returncode}")
        except OSError as e:
            log(f"notify: could not run --on-finish ({e.strerror or e})")
