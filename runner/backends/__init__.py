"""How items get answers: one interface, one implementation per way of asking, chosen once by `make_backend`.

- `interactive.Pool`: a pool of concurrent requests, each answered in seconds (every api_format);
- `batch` (Google's Batch Mode): the items written to a file, submitted as batches, collected later.

The job hands a backend the items to run and the image files found on disk without a record;
the backend puts every finished item through the session's sink, so the manifest, the resume
and the report never know which backend ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from ..engine.feed import Feed
    from ..engine.session import Session
    from ..output import Store
    from ..pricing import PriceTable
    from ..spec import Item, JobSpec
    from ..spec.items import Shard


class Backend(Protocol):
    in_flight: str  # what a first Ctrl+C waits for, and what a second does, in words

    async def run(self, feed: Feed, on_disk: dict[int, list[str]] | None = None) -> None:
        """Get answers for the feed's items (recorded through the session's sink, each given back to
        `feed.finished`) until there are no more or the run stops."""
        ...

    def interrupt(self) -> None:
        """A first Ctrl+C: start nothing new; what is in flight finishes and is recorded."""
        ...

    def cancel_requests(self) -> None:
        """A second Ctrl+C: give up on what is in flight (what is already in hand is still recorded)."""
        ...


def make_backend(
    spec: JobSpec,
    session: Session,
    prices: PriceTable,
    store: Store,
    *,
    base_url: str,
    api_key: str,
    concurrency: int,
    shard: Shard | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    lookup: Callable[[set[str]], dict[str, Item]] | None = None,
    wait: bool = True,
    poll_s: float | None = None,
    run_id: str = "",
) -> Backend:
    """The backend a spec asks for (its `mode`), with the request format of its `api_format`.

    `lookup` finds the Items of item ids (batch mode holds only ids while batches are open); `wait`
    False submits and returns (--no-wait); `poll_s` overrides the spec's batch.poll_s."""
    from ..engine.plan import rpm_share
    from ..gateway.client import Client
    from ..gateway.deadline import Deadlines
    from ..gateway.formats import make_format
    from ..gateway.http import make_http
    from ..policy import ServerWaitOrBackoff
    from .interactive import Pool

    request_format = make_format(spec.api_format, dict(spec.model_ids))
    if spec.mode == "batch":
        from ..gateway.gemini import GeminiFormat
        from .batch.api import GoogleBatchApi
        from .batch.backend import BatchBackend

        assert isinstance(request_format, GeminiFormat)
        api = GoogleBatchApi(base_url, api_key, spec.timeout_s, transport, int(spec.max_response_mb * 2**20))
        return BatchBackend(
            session, store, api, request_format, prices,
            spec.inputs, lookup=lookup or (lambda ids: {}), job_name=spec.name, api_key=api_key,
            base_url=base_url, key_env=spec.api_key_env, max_requests=spec.batch_max_requests,
            max_attempts=spec.max_attempts, poll_s=poll_s or spec.batch_poll_s, wait=wait, run_id=run_id,
            # how long a create with no answer may take to show in the list: 30 s, fewer on a fast clock
            unknown_grace_s=min(30.0, 10 * (poll_s or spec.batch_poll_s)),
            work_dir=store.scratch_dir(),
        )  # fmt: skip
    http = make_http(base_url, request_format.auth_headers(api_key), spec.timeout_s, concurrency, transport)
    client = Client(
        http, api_key, spec.timeout_s, request_format, base_url=base_url, inputs=spec.inputs,
        deadlines=Deadlines(tick_s=min(1.0, max(0.05, spec.timeout_s / 20))),
        max_response_bytes=int(spec.max_response_mb * 2**20),
    )  # fmt: skip
    return Pool(
        session,
        client,
        prices,
        concurrency=concurrency,
        requests_per_minute=rpm_share(spec, shard),
        max_attempts=spec.max_attempts,
        breaker_limit=spec.max_consecutive_failures,
        backoff=ServerWaitOrBackoff(spec.backoff_base_s, spec.backoff_max_s),
    )
