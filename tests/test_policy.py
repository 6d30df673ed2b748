"""Failure policy, rate limits, adaptive concurrency, circuit breaker and budget."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from tenacity import AsyncRetrying, RetryCallState

from runner.engine.budget import Budget
from runner.engine.limits import AdaptiveConcurrency, RateLimiter
from runner.policy import (
    POLICY,
    Action,
    CircuitBreaker,
    Failure,
    ServerWaitOrBackoff,
    classify_status,
    clean_message,
    parse_retry_after,
)

from .conftest import MockGateway, StartGateway, latest, read_manifest, run_cli, write_spec


def test_a_wrong_key_aborts_at_once(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(api_key="sk-the-right-one")
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(200)], concurrency=4)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "auth" in proc.stderr and "key" in proc.stderr
    assert gw.stats()["requests"] <= 4  # the first wave, nothing after it (the event, not a time)
    # items cut short by the abort are retried next time, not written off
    assert run_cli("run", str(path), "--no-progress", "--concurrency", "4").returncode == 3


@pytest.mark.parametrize(("fault", "kind"), [("402", "no_balance"), ("403", "forbidden")])
def test_no_balance_and_forbidden_abort(tmp_path: Path, gateway: StartGateway, fault: str, kind: str) -> None:
    gw = gateway(fault_rates=((fault, 1.0),))
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(50)], concurrency=2)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and kind in proc.stderr
    assert gw.stats()["requests"] <= 2


def test_the_circuit_breaker_stops_a_run_that_cannot_succeed(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(
        tmp_path, mock.base_url, prompts=[f"p{i} [fault:500]" for i in range(40)],
        concurrency=1, max_attempts=2, max_consecutive_failures=3,
    )  # fmt: skip
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3
    assert "circuit breaker: 3 items in a row failed with server_error" in proc.stderr
    assert "next: the service kept failing: wait a while" in proc.stderr
    assert mock.stats()["requests"] == 3 * 2


def test_a_breaker_on_refused_requests_does_not_say_wait(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(
        tmp_path, mock.base_url, prompts=[f"p{i} [fault:400]" for i in range(10)],
        concurrency=1, max_consecutive_failures=3,
    )  # fmt: skip
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3 and "3 items in a row failed with bad_request" in proc.stderr, proc.stderr
    assert "waiting will not change that: check api_format" in proc.stderr and "wait a while" not in proc.stderr


def test_per_prompt_failures_do_not_trip_the_breaker(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(
        tmp_path, mock.base_url, prompts=[f"p{i} [fault:content_filter]" for i in range(6)] + ["fine"],
        concurrency=1, max_consecutive_failures=2,
    )  # fmt: skip
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1
    assert len(read_manifest(tmp_path / "out")) == 7


def test_the_budget_stops_new_items_and_a_bigger_one_resumes(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=[f"p{i}" for i in range(10)], concurrency=2, max_cost_usd=0.5)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 3
    assert "budget reached" in proc.stderr
    spent = sum(r["cost_usd"] for r in read_manifest(tmp_path / "out"))
    assert 0 < spent <= 0.5 and len(read_manifest(tmp_path / "out")) == 3
    est = run_cli("estimate", str(path))
    assert "warning: max_cost_usd is 0.5" in est.stdout
    proc = run_cli("run", str(path), "--no-progress", "--max-cost", "2")
    assert proc.returncode == 0, proc.stderr
    assert all(r["status"] == "ok" for r in latest(tmp_path / "out").values()) and len(latest(tmp_path / "out")) == 10
    assert mock.stats()["generations"] == 10


def test_requests_per_minute_keeps_under_a_short_window_limit(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(rpm_limit=600, rpm_window_s=1.0)  # at most 10 requests in any 1 s
    # 5 a second, half the limit: sends spaced evenly still arrive bunched on a loaded machine (and at
    # 7.5 a second three of them once met the window's limit); a burst of 16 would meet it at once
    path = write_spec(
        tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(25)], concurrency=16, requests_per_minute=300
    )
    t0 = time.monotonic()
    proc = run_cli("run", str(path), "--no-progress")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    stats = gw.stats()
    assert stats["by_status"].get("429", 0) == 0
    assert stats["generations"] == 25
    assert elapsed >= 24 * 60 / 300  # evenly spaced, no burst


def test_rate_limited_requests_are_retried_until_they_succeed(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(rpm_limit=600, rpm_window_s=1.0)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(30)], concurrency=16, max_attempts=10)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert gw.stats()["by_status"].get("429", 0) > 0
    assert all(r["status"] == "ok" for r in latest(tmp_path / "out").values())


def test_the_policy_table_covers_every_kind() -> None:
    assert POLICY["rate_limited"].action is Action.RETRY
    assert POLICY["bad_request"].action is Action.FAIL and POLICY["content_filter"].action is Action.FAIL
    assert {k for k, r in POLICY.items() if r.action is Action.ABORT} == {
        "auth",
        "no_balance",
        "forbidden",
        "not_found",
        "certificate",
    }
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for kind, rule in POLICY.items():
        assert f"| `{kind}` | {rule.action.value} |" in readme, f"README's failure table lacks {kind}"


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (429, b'{"error": {"message": "slow down", "type": "rate_limit_error"}}', "rate_limited"),
        (503, b'{"error": {"message": "The model is overloaded", "type": "", "code": 503}}', "server_error"),
        (500, b'{"error": {"message": "empty", "code": "empty_response"}}', "server_error"),
        (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "server_error"),
        (
            400,
            b'{"error": {"message": "request blocked by Gemini API", "type": "prompt_blocked", "code": "prompt_blocked"}}',
            "prompt_blocked",
        ),
        (400, b'{"error": {"message": "bad ratio (request id: 1)", "type": "", "code": 400}}', "bad_request"),
        (413, b"", "bad_request"),
        (401, b"{", "auth"),
        (402, b"", "no_balance"),
        (403, b'{"error": {"type": "permission_error"}}', "forbidden"),
    ],
)
def test_classify_status_survives_any_body(status: int, body: bytes, kind: str) -> None:
    failure = classify_status(status, body, {}, "sk-secret")
    assert failure.kind == kind and failure.status == status and failure.message


def test_retry_hints_from_header_date_and_google_body() -> None:
    assert parse_retry_after("7") == 7.0
    assert 28 <= parse_retry_after(formatdate(time.time() + 30, usegmt=True)) <= 30  # type: ignore[operator]
    assert parse_retry_after("soon") is None
    body = b'{"error": {"code": 429, "message": "Please retry in 13.2s.", "details": [{"retryDelay": "13s"}]}}'
    assert classify_status(429, body, {}, None).retry_after == 13.0
    assert classify_status(429, body, {"retry-after": "2"}, None).retry_after == 2.0
    hinted = Failure("rate_limited", 429, "x", retry_after=5.0)
    assert 5.0 <= ServerWaitOrBackoff(base_s=1, cap_s=60)(_state(1, hinted)) <= 6.0
    assert all(0 <= ServerWaitOrBackoff(base_s=1, cap_s=8)(_state(a, None)) <= 8 for a in range(1, 30))


def _state(attempt: int, result: Failure | None) -> RetryCallState:
    """tenacity's view of a call after `attempt` attempts, the last one returning `result`."""
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    state.set_result(result)
    return state


def test_messages_never_carry_the_key() -> None:
    text = clean_message("bad key sk-secret-123456 (Bearer sk-secret-123456) " + "x" * 1000, "sk-secret-123456")
    assert "sk-secret" not in text and len(text) <= 300


def test_circuit_breaker_counts_one_kind_in_a_row() -> None:
    b = CircuitBreaker(3)
    assert not b.failure("server_error") and not b.failure("timeout") and not b.failure("server_error")
    assert not b.failure("server_error")
    assert b.failure("server_error")
    b.success()
    assert not b.failure("server_error")


class FakeClock:
    """The limits' clock, moved by hand: waits pass at once and are recorded."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    async def wait(self, seconds: float, stopping: anyio.Event) -> bool:
        await anyio.lowlevel.checkpoint()
        if stopping.is_set():
            return False
        self.waits.append(seconds)
        self.t += seconds
        return True


def test_rate_limiter_spaces_requests_and_pauses_for_a_server_wait() -> None:
    clock = FakeClock()

    async def main() -> None:
        rl, never = RateLimiter(600, clock), anyio.Event()  # one every 0.1 s
        sent = []
        for _ in range(5):
            assert await rl.acquire(never)
            sent.append(clock.t - 1000.0)
        assert sent == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])  # evenly spaced: no burst
        assert rl.pause(30.0) and not rl.pause(29.5)  # a shorter wait than the one in force says nothing
        assert await rl.acquire(never)
        assert clock.t - 1000.0 == pytest.approx(30.4)  # everyone waited for the server's 30 s
        stopping = anyio.Event()
        rl.pause(60)
        stopping.set()
        assert not await rl.acquire(stopping)  # a stop ends the wait for a slot: nothing is sent

    anyio.run(main)


def test_an_unlimited_rate_never_waits() -> None:
    clock = FakeClock()

    async def main() -> None:
        rl = RateLimiter(0, clock)
        for _ in range(100):
            assert await rl.acquire(anyio.Event())

    anyio.run(main)
    assert clock.waits == []


def test_budget_reserves_tops_up_and_settles() -> None:
    b = Budget(1.0, spent_before=0.4)
    assert b.reserve(0.25) == 0.25 and b.reserve(0.25) == 0.25
    assert b.reserve(0.25) is None  # 0.4 spent + 0.5 in flight + 0.25 > 1.0
    b.settle(0.25, 0.25, images=1)  # one answer came back with one image
    assert (b.spent, b.in_flight) == (pytest.approx(0.65), 0.25)
    b.settle(0.25, 0.0, images=0)  # a failure costs nothing and frees its reservation
    assert b.in_flight == 0 and b.reserve(0.25) == 0.25
    b.settle(0.25, 0.75, images=3)  # an answer of three images: every request now reserves three
    assert b.images_per_answer == 3 and b.reserve(0.1) is None  # 1.4 spent: nothing fits any more
    open_ended = Budget(None, spent_before=100.0)
    assert open_ended.reserve(1e6) == 1e6 and open_ended.top_up(1e6, 2e6) == 2e6


def test_budget_top_up_refuses_what_no_longer_fits() -> None:
    b = Budget(1.0, spent_before=0.0)
    held = b.reserve(0.3)
    assert held == 0.3
    b.settle(0.0, 0.0, images=2)  # another answer held two images
    assert b.top_up(held, 0.3) == 0.6  # this item's next request may now cost two images
    assert b.in_flight == pytest.approx(0.6)
    b.settle(0.0, 0.5, images=3)
    assert b.top_up(0.6, 0.3) is None  # 0.5 spent + 0.9 would pass 1.0: the request does not go


def test_adaptive_concurrency_halves_once_per_burst_and_recovers() -> None:
    clock = FakeClock()

    async def main() -> list[int]:
        ac = AdaptiveConcurrency(16, cooldown_s=10, clock=clock)
        for _ in range(20):
            ac.rate_limited()
        seen = [ac.limit]
        for _ in range(8 + 9):
            ac.succeeded()
        seen.append(ac.limit)
        clock.t += 11  # past the cooldown: the next burst halves again
        ac.rate_limited()
        seen.append(ac.limit)
        return seen

    assert anyio.run(main) == [8, 10, 5]


def test_adaptive_concurrency_says_each_change_once_with_the_rate_it_measured() -> None:
    """Issue 22: a night of 429s is a few lines, each with the request rate measured and a
    requests_per_minute to set, not the same line 25 times."""
    clock = FakeClock()

    async def main() -> list[str | None]:
        ac = AdaptiveConcurrency(4, cooldown_s=1, clock=clock, repeat_s=600)
        for _ in range(30):  # 30 requests over the last 10 seconds: 180 a minute
            ac.sent()
            clock.t += 1 / 3
        said = [ac.rate_limited()]  # 4 -> 2
        clock.t += 2
        said.append(ac.rate_limited())  # 2 -> 1
        said += [ac.succeeded() for _ in range(1 + 2 + 3)]  # 1 -> 2, 2 -> 3, 3 -> 4
        clock.t += 2
        said.append(ac.rate_limited())  # 4 -> 2 again, within 10 minutes: not said again
        clock.t += 2
        said.append(ac.rate_limited())  # 2 -> 1 again: not said either
        clock.t += 601
        said += [ac.succeeded(), ac.rate_limited()]  # 1 -> 2, 2 -> 1: ten minutes on, said again
        return said

    said = anyio.run(main)
    assert said[0] == (
        "rate limited (429) at ~180 requests/minute: concurrency lowered from 4 to 2; set requests_per_minute "
        "to stay under the limit (e.g. requests_per_minute: 144)"
    )
    assert said[1] is not None and "concurrency lowered from 2 to 1" in said[1]
    assert [s for s in said[2:8] if s] == [
        "1 success in a row: concurrency raised to 2 (of 4)",
        "2 successes in a row: concurrency raised to 3 (of 4)",
        "3 successes in a row: concurrency raised to 4 (of 4)",
    ]
    assert said[8:10] == [None, None]
    assert said[10] == "1 success in a row: concurrency raised to 2 (of 4)" and "from 2 to 1" in str(said[11])
