"""What a run says after a night nobody watched: retries explained, next steps, status lines, labels, notices."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .conftest import KEY, MockGateway, StartGateway, latest, read_manifest, run_cli, write_spec


def test_every_retry_says_why_on_its_line_in_the_report_and_the_summary(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a [fault:503x2]", "b [fault:429x1]", "c"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    recs = {r["prompt"]: r for r in read_manifest(tmp_path / "out")}
    assert recs["a [fault:503x2]"]["retried"] == {"server_error": 2} and recs["a [fault:503x2]"]["attempts"] == 3
    assert recs["b [fault:429x1]"]["retried"] == {"rate_limited": 1}
    assert "retried" not in recs["c"]
    assert "retried: rate_limited=1, server_error=2" in proc.stderr
    rep = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert rep["retries_by_kind"] == {"server_error": 2, "rate_limited": 1}
    assert sum(rep["retries_by_kind"].values()) == rep["retries"] == 3
    assert "retried" in run_cli("report", str(tmp_path / "out")).stdout


def test_the_resume_hint_keeps_the_gateway_it_was_given(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway()
    # the spec names another gateway (a paid one, say): the hint must not send the rerun there
    path = write_spec(tmp_path, "http://127.0.0.1:9/v1", prompts=["a", "b [fault:content_filter]"])
    proc = run_cli("run", str(path), "--no-progress", "--base-url", gw.base_url)
    assert proc.returncode == 1, proc.stderr
    assert f"`runner run {path} --base-url {gw.base_url} --retry-failed` tries them again" in proc.stderr
    proc = run_cli("run", str(path), "--no-progress", "--mock", "--mock-fault", "503=0.5", "--out", str(tmp_path / "m"))
    assert re.search(r"`runner run \S+ --out \S+ --mock --mock-fault 503=0.5", proc.stderr), proc.stderr


def test_the_limiter_says_what_it_decided(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(fault_retry_after_s=1.0)
    prompts = [f"p{i} [fault:429x1]" for i in range(6)]
    path = write_spec(tmp_path, gw.base_url, prompts=prompts, concurrency=4)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    said = re.findall(r"rate limited \(429\) at ~(\d+) requests/minute: concurrency lowered from 4 to 2; set "
                      r"requests_per_minute to stay under the limit \(e\.g\. requests_per_minute: (\d+)\)", proc.stderr)  # fmt: skip
    assert len(said) == 1 and 1 <= int(said[0][1]) <= int(said[0][0]), proc.stderr  # measured, said once
    assert "the server asked to wait 1s: pausing every request until then" in proc.stderr


@pytest.mark.parametrize(
    ("setup", "expected_exit", "hint"),
    [
        ({"max_cost_usd": 0.2}, 3, r"raise max_cost_usd in the spec or pass --max-cost"),
        ({"api_key": "another-key"}, 3, r"check the key in \$RUNNER_TEST_KEY"),
        (
            {"prompts": ["a", "b [fault:content_filter]"]},
            1,
            r"1 item failed permanently \(content_filter 1\): .*--retry-failed` tries",
        ),
        ({"prompts": ["a", "b [fault:503]"], "max_attempts": 2}, 1, r"1 item failed with errors a retry may cure"),
        (
            {"prompts": ["a", "b [fault:400]"]},
            1,
            r"1 item failed permanently \(bad_request 1\).*\(a bad_request is the request",
        ),
    ],
)
def test_each_stop_says_what_to_do_next(
    tmp_path: Path, gateway: StartGateway, setup: dict[str, Any], expected_exit: int, hint: str
) -> None:
    gw = gateway(api_key=setup.pop("api_key", None))
    fields = {"prompts": [f"p{i}" for i in range(4)], "concurrency": 1, **setup}
    path = write_spec(tmp_path, gw.base_url, **fields)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == expected_exit, proc.stderr
    assert re.search(r"next: .*" + hint, proc.stderr), proc.stderr
    # the closing line names the job, how long it took and where its images are
    assert re.search(r"^t: \d+ ok, \d+ failed, .* in \d+s -> ", proc.stderr, re.M), proc.stderr
    if expected_exit == 1:  # failures: where to see which and why
        assert f"next: which items failed and why: `runner report {tmp_path / 'out'}`" in proc.stderr
    if "max_cost_usd" in setup:  # the stop line's spend is the summary's
        spent = re.search(r"\$([\d.]+) in all", proc.stderr).group(1)  # type: ignore[union-attr]
        assert f"stopped: budget reached: ${spent} spent of max_cost_usd 0.2" in proc.stderr
        assert "rerun the same command" not in proc.stderr


def test_status_lines_in_a_log(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(latency_s=0.3)
    path = write_spec(tmp_path, gw.base_url, prompts=[f"p{i}" for i in range(6)], concurrency=1)
    proc = run_cli("run", str(path), "--no-progress", "--status-every", "0.2")
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \d/6 items \(\d+%\): \d ok, 0 failed, 0 retries, \$[\d.]+ spent, "
        r"[\d.]+ items/min, ETA \S+",
        proc.stderr,
        re.M,
    )
    assert lines, proc.stderr  # the run lasts 1.8 s at least: several lines
    assert "\r" not in proc.stderr
    quiet = run_cli("run", str(path), "--no-progress", "--status-every", "0", "--retry-failed")
    assert "items/min" not in quiet.stderr


def test_labels_from_csv_jsonl_and_inline_vars(tmp_path: Path, mock: MockGateway) -> None:
    (tmp_path / "p.csv").write_text("prompt,style,id\na cat,ink,c1\na dog,oil,c2\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a hen", "mood": "calm", "n": 3}\n')
    path = write_spec(
        tmp_path,
        mock.base_url,
        prompts=[{"prompt": "a fox", "vars": {"animal": "fox", "season": "winter"}}],
        prompt_files=["p.csv", "p.jsonl"],
    )
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    labels = {r["prompt"]: r["vars"] for r in read_manifest(tmp_path / "out")}
    assert labels == {
        "a fox": {"animal": "fox", "season": "winter"},
        "a cat": {"style": "ink"},
        "a dog": {"style": "oil"},
        "a hen": {"mood": "calm", "n": "3"},
    }
    rep = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert rep["vars"]["style"] == {"ink": 1, "oil": 1}
    assert run_cli("export", str(tmp_path / "out")).returncode == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert {r["prompt"]: r["style"] for r in rows} == {"a fox": None, "a cat": "ink", "a dog": "oil", "a hen": None}


def test_mock_rehearsal_in_one_process(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=[f"p{i}" for i in range(12)], concurrency=4)
    proc = run_cli("run", str(path), "--mock", "--no-progress", "--mock-latency", "0.01", "--mock-fault", "503=0.3")
    assert proc.returncode == 0, proc.stderr
    recs = latest(tmp_path / "out")
    assert len(recs) == 12 and all(r["status"] == "ok" for r in recs.values())
    assert sum(r.get("retried", {}).get("server_error", 0) for r in read_manifest(tmp_path / "out")) > 0
    bad = run_cli("run", str(path), "--mock", "--mock-fault", "nosuch=0.5")
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_money_has_no_float_noise(tmp_path: Path) -> None:
    path = write_spec(tmp_path, prompts=["a", "b", "c"], pricing={"nanobanana_pro": 0.1})
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert est["estimated_cost_usd"] == 0.3 and est["by_model"][0]["cost_usd"] == 0.3


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[bytes]]]:
    """A webhook receiver on loopback that keeps every body it gets."""
    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


def test_a_finished_run_notifies_a_webhook_and_a_command_without_the_key(
    tmp_path: Path, mock: MockGateway, webhook: tuple[str, list[bytes]]
) -> None:
    url, got = webhook
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b [fault:content_filter]"])
    command = f"cat > {tmp_path}/summary.json; env > {tmp_path}/env.txt"
    proc = run_cli("run", str(path), "--no-progress", "--notify-url", url, "--on-finish", command)
    assert proc.returncode == 1, proc.stderr
    (body,) = got
    sent = json.loads(body)
    assert sent["text"].startswith("t: 1 ok, 1 failed") and sent["runner"]["exit_code"] == 1
    assert sent["text"].endswith(f"-> {tmp_path / 'out'}") and sent["runner"]["name"] == "t"  # the job, where it is
    assert sent["runner"]["failures_by_kind"] == {"content_filter": 1}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] == 1 and summary["output_dir"].endswith("out")
    env = (tmp_path / "env.txt").read_text()
    assert "RUNNER_EXIT_CODE=1" in env and "RUNNER_TEST_KEY" not in env
    assert KEY not in body.decode() and KEY not in env
    # a webhook that is down costs a log line, never the run
    down = run_cli("run", str(path), "--no-progress", "--retry-failed", "--notify-url", "http://127.0.0.1:9/x")
    assert down.returncode == 1 and "notify: could not reach the webhook" in down.stderr


def test_a_bug_exits_70_with_one_line_and_the_details_in_a_file(
    tmp_path: Path, mock: MockGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.engine.job  # imported before patching: it binds make_plan by name

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"a bug near {KEY}")

    monkeypatch.setattr(runner.engine.job, "make_plan", broken)
    path = write_spec(tmp_path, mock.base_url)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 70 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("runner: internal error (a bug): RuntimeError") and KEY not in proc.stderr
    details = Path(line.rsplit("details in ", 1)[1])
    text = details.read_text()
    assert "Traceback" in text and "make_plan" not in line and KEY not in text and "[key]" in text


def test_a_bug_with_one_item_fails_that_item_alone(
    tmp_path: Path, mock: MockGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.gateway.formats import ChatFormat

    real = ChatFormat.request

    def sometimes_broken(self: ChatFormat, item: Any, *args: Any) -> Any:
        if "poison" in item.prompt:
            raise KeyError("a bug")
        return real(self, item, *args)

    monkeypatch.setattr(ChatFormat, "request", sometimes_broken)
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "poison pill"])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    recs = {r["prompt"]: r for r in read_manifest(tmp_path / "out")}
    assert recs["a"]["status"] == recs["b"]["status"] == "ok"
    error = recs["poison pill"]["error"]
    assert error["kind"] == "internal" and "KeyError" in error["message"]
    assert Path(error["message"].rsplit("details in ", 1)[1].rstrip(")")).is_file()
    # a rerun tries it again (the next version may not have the bug)
    monkeypatch.setattr(ChatFormat, "request", real)
    assert run_cli("run", str(path), "--no-progress").returncode == 0


def test_mock_images_are_never_taken_for_real_ones(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b"])
    assert run_cli("run", str(path), "--mock", "--no-progress").returncode == 0
    proc = run_cli("run", str(path), "--no-progress")  # with a key, against a gateway
    assert proc.returncode == 2 and "made by the built-in mock" in proc.stderr and "--out" in proc.stderr
    assert mock.stats()["requests"] == 0
    assert "made by the built-in mock" in run_cli("estimate", str(path)).stdout
    assert "(images made by the built-in mock)" in run_cli("report", str(tmp_path / "out")).stdout
    other = run_cli("run", str(path), "--no-progress", "--out", str(tmp_path / "real"))
    assert other.returncode == 0 and mock.stats()["requests"] == 2
    # the other way round: a --mock run never mixes its images into a dir of paid ones
    proc = run_cli("run", str(path), "--mock", "--no-progress", "--out", str(tmp_path / "real"))
    assert proc.returncode == 2 and "made by a gateway" in proc.stderr
    # the refused --mock run left the dir as it was
    assert run_cli("run", str(path), "--no-progress", "--out", str(tmp_path / "real")).returncode == 0


def test_report_says_how_much_of_the_spec_has_not_run(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, prompts=["a", "b", "c"], max_cost_usd=0.2)
    assert run_cli("run", str(path), "--no-progress").returncode == 3  # the budget stops it after one
    text = run_cli("report", str(tmp_path / "out")).stdout
    assert "2 of the 3 in the spec not yet run" in text
    assert "job spec" in run_cli("report", str(path)).stderr


def test_the_library_notifies_as_the_cli_does(
    tmp_path: Path, mock: MockGateway, webhook: tuple[str, list[bytes]]
) -> None:
    """RunOptions.notify_url and on_finish work from the library, not only from the command line."""
    import anyio

    from runner import RunOptions, load_spec, run_job_async

    url, got = webhook
    path = write_spec(tmp_path, mock.base_url, prompts=["a"])
    marker = tmp_path / "done.json"
    options = RunOptions(api_key=KEY, notify_url=url, on_finish=f"cat > {marker}", progress=False)
    result = anyio.run(run_job_async, load_spec(path), options, lambda _: None)
    assert result.exit_code == 0
    (body,) = [json.loads(b) for b in got]
    assert body["runner"]["ok"] == 1 and "1 ok" in body["text"]
    assert json.loads(marker.read_text())["ok"] == 1
