"""The mock's Files and Batch APIs: resumable uploads, batches on a fast clock, results files generated as they stream.

Faithful where runner's guarantees are at stake: create is not idempotent, a batch can end
FAILED, EXPIRED, CANCELLED or PARTIALLY_SUCCEEDED, quotas answer 429, results come in any order
with lines missing, cut off or twice, and downloads stream. With a `state_dir` everything it
knows is kept on disk, so a client killed at any moment (or a `--mock` run killed and rerun)
finds its batches again. Every paid line is counted by key, and a key submitted while it is
already in a live batch is counted too (`double_submits`): what the kill-loop tests assert on.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..models import MODELS
from .batchstate import MockBatch, MockFile, Upload
from .faults import MARKER
from .google import RPC_CODES, GoogleError, invalid, line_error, model_of, now_iso, parse_generate
from .google import field as get
from .validate import Generation

# What a line of a batch's results can be; a chat fault kind maps onto one of these.
LINE_OUTCOMES = {
    "429": "error:RESOURCE_EXHAUSTED", "429_noretry": "error:RESOURCE_EXHAUSTED", "500": "error:INTERNAL",
    "500_empty": "error:INTERNAL", "502": "error:UNAVAILABLE", "503": "error:UNAVAILABLE", "504": "error:DEADLINE_EXCEEDED",
    "400": "error:INVALID_ARGUMENT", "400_relayed": "error:INVALID_ARGUMENT", "413": "error:INVALID_ARGUMENT",
    "401": "error:UNAUTHENTICATED", "402": "error:RESOURCE_EXHAUSTED", "403": "error:PERMISSION_DENIED",
    "drop": "missing", "html": "error:INTERNAL", "empty": "missing", "badjson": "truncate", "slow": "missing",
    "gzip": "ok", "truncate": "truncate", "missing": "missing", "duplicate": "duplicate",
    "prompt_blocked": "blocked_prompt", "content_filter": "blocked", "text_only": "text", "not_image": "not_image",
    "two_images": "two_images", "same_image": "same_image", "wrong_shape": "wrong_shape", "uniform": "uniform",
    "unicode": "unicode",
}  # fmt: skip
BATCH_FAULTS = ("failed", "expired", "create_drop", "create_503", "create_429", "missing", "truncate", "duplicate")
_PAID = ("ok", "duplicate", "two_images", "same_image", "wrong_shape", "uniform", "unicode")


class BatchService:
    """The Files and Batch APIs. `generate` answers one request's line (the gateway's generation);
    `pick` picks a line's fault the gateway's way (markers, then rates)."""

    def __init__(
        self,
        *,
        model_ids: dict[str, str],
        latency_s: float,
        faults: tuple[tuple[str, float], ...],
        max_open: int,
        max_tokens: int,
        seed: int,
        state_dir: Path | None,
        pick: Callable[[str, str], str | None],
    ) -> None:
        self.model_ids = model_ids
        self.latency_s = latency_s
        self.faults = faults
        self.max_open = max_open
        self.max_tokens = max_tokens
        self.pick = pick
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="runner-mock-google-") if state_dir is None else None
        self.dir = Path(self._tmp.name) if self._tmp is not None else Path(state_dir or ".")
        for sub in ("files", "batches", "uploads"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.files: dict[str, MockFile] = {}
        self.batches: dict[str, MockBatch] = {}
        self.uploads: dict[str, Upload] = {}
        self._batch_uses: dict[tuple[str, int], int] = {}
        self.stats: dict[str, Any] = {}
        self.reset_stats()
        self._load()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- statistics ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        with self._lock:
            self.stats = {
                "creates": 0, "batches_created": 0, "quota_refusals": 0, "unknown_outcomes": 0, "uploads": 0,
                "downloads": 0, "deleted_files": 0, "cancels": 0, "paid_keys": Counter(), "double_submits": 0,
                "max_open": 0,
            }  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            s = dict(self.stats)
            s["paid_keys"] = dict(s["paid_keys"])
            s["paid"] = sum(s["paid_keys"].values())
            s["open"] = sum(b.live(now) for b in self.batches.values())
            s["files"] = len(self.files)
            s["batches"] = {b.id: b.state(now) for b in self.batches.values()}
        return s

    # -- persistence ----------------------------------------------------------------------------
    def _load(self) -> None:
        for path in sorted((self.dir / "files").glob("*.json")):
            self.files[f"files/{path.stem}"] = MockFile(**json.loads(path.read_text()))
        for path in sorted((self.dir / "batches").glob("*.json")):
            self.batches[path.stem] = MockBatch(**json.loads(path.read_text()))

    def _save(self, obj: MockFile | MockBatch) -> None:
        if isinstance(obj, MockFile):
            path = self.dir / "files" / f"{obj.name.removeprefix('files/')}.json"
        else:
            path = self.dir / "batches" / f"{obj.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(obj)))
        tmp.replace(path)

    def _content(self, name: str) -> Path:
        return self.dir / "files" / f"{name.removeprefix('files/')}.bin"

    # -- the Files API ----------------------------------------------------------------------------
    def upload_start(self, headers: dict[str, str], body: Any) -> str:
        if (
            headers.get("x-goog-upload-protocol", "").lower() != "resumable"
            or headers.get("x-goog-upload-command") != "start"
        ):
            raise invalid("the Files API takes resumable uploads (X-Goog-Upload-Protocol: resumable, command start)")
        try:
            size = int(headers.get("x-goog-upload-header-content-length", ""))
        except ValueError:
            raise invalid("X-Goog-Upload-Header-Content-Length is required") from None
        file = get(body, "file") if isinstance(body, dict) else None
        display = str(get(file, "displayName") or "") if isinstance(file, dict) else ""
        upload_id = secrets.token_hex(12)
        mime = headers.get("x-goog-upload-header-content-type") or (
            get(file, "mimeType") if isinstance(file, dict) else None
        )
        self.uploads[upload_id] = Upload(
            display, str(mime or "application/octet-stream"), size, self.dir / "uploads" / upload_id
        )
        self.uploads[upload_id].path.write_bytes(b"")
        return upload_id

    def upload_chunk(self, upload_id: str, headers: dict[str, str], data: bytes) -> MockFile | None:
        """Take one chunk; the File once the upload is finalized, else None (still active)."""
        up = self.uploads.get(upload_id)
        if up is None:
            raise GoogleError(404, "NOT_FOUND", "upload session not found")
        command = headers.get("x-goog-upload-command", "")
        offset = headers.get("x-goog-upload-offset")
        if offset is not None and offset.isdigit() and int(offset) != up.received:
            raise invalid(f"upload offset {offset} is not where the upload is ({up.received})")
        with up.path.open("ab") as f:
            f.write(data)
        up.received += len(data)
        if "finalize" not in command:
            return None
        if up.received != up.size:
            raise invalid(f"the upload has {up.received} bytes, not the {up.size} announced")
        del self.uploads[upload_id]
        file_id = secrets.token_hex(6)
        sha = hashlib.sha256(up.path.read_bytes()).hexdigest()
        up.path.replace(self._content(f"files/{file_id}"))
        mock = MockFile(f"files/{file_id}", up.display_name, up.mime, up.size, sha, time.time())
        with self._lock:
            self.files[mock.name] = mock
            self.stats["uploads"] += 1
        self._save(mock)
        return mock

    def file(self, name: str) -> MockFile:
        found = self.files.get(name)
        if found is None:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                f"You do not have permission to access the File {name.removeprefix('files/')} or it may not exist.",
            )
        return found

    def file_sha(self, uri: str) -> str | None:
        name = "files/" + uri.rstrip("/").rsplit("/files/", 1)[-1].removeprefix("files/")
        found = self.files.get(name)
        return found.sha256 if found is not None else None

    def delete_file(self, name: str) -> None:
        with self._lock:
            gone = self.files.pop(name, None)
            if gone is not None:
                self.stats["deleted_files"] += 1
        if gone is None:
            raise GoogleError(404, "NOT_FOUND", f"File {name} not found.")
        for path in (self._content(name), self.dir / "files" / f"{name.removeprefix('files/')}.json"):
            path.unlink(missing_ok=True)

    # -- batches ------------------------------------------------------------------------------
    def create(self, model_id: str, body: Any) -> tuple[MockBatch, str | None]:
        """A new batch, or GoogleError; the second value is a fault to answer with after creating
        (`drop`, `503`): the client then cannot know that it exists."""
        with self._lock:
            self.stats["creates"] += 1
        model = model_of(model_id, self.model_ids)
        batch = get(body, "batch") if isinstance(body, dict) else None
        if not isinstance(batch, dict):
            raise invalid("batch is required")
        config = get(batch, "inputConfig")
        file_name = get(config, "fileName") if isinstance(config, dict) else None
        if isinstance(config, dict) and get(config, "requests") is not None:
            raise invalid("the mock takes batches from a file (inputConfig.fileName), not inline requests")
        if not isinstance(file_name, str):
            raise invalid("batch.inputConfig.fileName is required")
        source = self.file(file_name)
        keys, offsets, tokens, prompts = self._read_input(source, model)
        if not keys:
            raise invalid("the input file has no requests")
        fault = self._draw()
        now = time.time()
        with self._lock:
            live = [b for b in self.batches.values() if b.live(now)]
            queued = sum(b.tokens for b in live)
            if (
                fault == "create_429"
                or (self.max_open and len(live) >= self.max_open)
                or (self.max_tokens and queued + tokens > self.max_tokens)
            ):
                self.stats["quota_refusals"] += 1
                raise GoogleError(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "Resource has been exhausted: too many batches or enqueued tokens in flight for this model.",
                )
            busy = {k for b in live for k in b.keys}
            self.stats["double_submits"] += sum(1 for k in keys if k in busy)
            marked = {self._batch_marker(p, k) for k, p in prompts} - {None}
            planned = "SUCCEEDED"
            if fault == "failed" or "batch_failed" in marked:
                planned = "FAILED"
            elif fault == "expired" or "batch_expired" in marked:
                planned = "EXPIRED"
            mock = MockBatch(
                id=secrets.token_hex(8), display_name=str(get(batch, "displayName") or ""), model=model,
                model_id=model_id, input_file=file_name, created=now, latency_s=self.latency_s, keys=keys,
                offsets=offsets, tokens=tokens, planned=planned, seed=self._rng.randrange(2**31),
            )  # fmt: skip
            self.batches[mock.id] = mock
            self.stats["batches_created"] += 1
            self.stats["max_open"] = max(self.stats["max_open"], len(live) + 1)
            if fault in ("create_drop", "create_503"):
                self.stats["unknown_outcomes"] += 1
        self._save(mock)
        return mock, {"create_drop": "drop", "create_503": "503"}.get(fault or "")

    def _batch_marker(self, prompt: str, key: str) -> str | None:
        """`[fault:batch_failed]` / `[fault:batch_expiredxN]` in a line's prompt: the whole batch ends so
        (counted per key apart from the line faults, which are drawn when the batch ends)."""
        for position, m in enumerate(MARKER.finditer(prompt)):
            kind, times = m.group(1), m.group(2)
            if kind not in ("batch_failed", "batch_expired"):
                continue
            used = self._batch_uses.get((key, position), 0)
            if times is None or used < int(times):
                self._batch_uses[(key, position)] = used + 1
                return kind
        return None

    def _draw(self) -> str | None:
        draw, total = self._rng.random(), 0.0
        for kind, rate in self.faults:
            if kind in ("failed", "expired", "create_drop", "create_503", "create_429"):
                total += rate
                if draw < total:
                    return kind
        return None

    def _line_rate(self, kind: str) -> float:
        return sum(rate for k, rate in self.faults if k == kind)

    def _read_input(self, source: MockFile, model: str) -> tuple[list[str], list[int], int, list[tuple[str, str]]]:
        keys, offsets, prompts, tokens, pos = [], [], [], 0, 0
        per_image = max(MODELS[model].tokens.values())
        with self._content(source.name).open("rb") as f:
            for line in f:
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    key = str(obj["key"])
                except (ValueError, KeyError, TypeError):
                    raise invalid(f"input line at byte {start} is not a JSON object with a key") from None
                keys.append(key)
                offsets.append(start)
                tokens += per_image
                request = obj.get("request") if isinstance(obj, dict) else None
                parts = request.get("contents", [{}])[-1].get("parts", []) if isinstance(request, dict) else []
                prompts.append((key, " ".join(p.get("text", "") for p in parts if isinstance(p, dict))))
        return keys, offsets, tokens, prompts

    def view(self, batch: MockBatch, base: str) -> dict[str, Any]:
        """The batch as the REST API shows it (an Operation), ending it first when its time has come."""
        now = time.time()
        state = batch.state(now)
        if state not in ("PENDING", "RUNNING", "CANCELLED") and batch.lines is None:
            self._finish(batch)
            state = batch.state(now)
        n = len(batch.keys)
        # A cancelled batch stops where it was: its counts (and its end) are those of the moment of the cancel.
        until = batch.cancelled if batch.cancelled is not None else now
        progress = int(n * min(1.0, max(0.0, (until - batch.created) / batch.latency_s))) if batch.latency_s else n
        done = progress if state in ("PENDING", "RUNNING", "CANCELLED") else n
        failed = sum(1 for o in batch.lines or [] if o.startswith("error:"))
        stats = {"requestCount": str(n), "successfulRequestCount": str(max(0, done - failed)),
                 "failedRequestCount": str(failed if done == n else 0), "pendingRequestCount": str(n - done)}  # fmt: skip
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{batch.model_id}", "displayName": batch.display_name, "name": f"batches/{batch.id}",
            "inputConfig": {"fileName": batch.input_file}, "createTime": now_iso(batch.created),
            "updateTime": now_iso(now), "batchStats": stats, "state": f"BATCH_STATE_{state}",
        }  # fmt: skip
        op: dict[str, Any] = {"name": f"batches/{batch.id}", "metadata": meta}
        if state not in ("PENDING", "RUNNING"):
            op["done"] = True
            meta["endTime"] = now_iso(
                batch.cancelled if batch.cancelled is not None else batch.created + batch.latency_s
            )
            if batch.results_file is not None:
                output = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
                          "responsesFile": batch.results_file}  # fmt: skip
                meta["output"] = output
                op["response"] = output
            elif state in ("FAILED", "EXPIRED"):
                op["error"] = {"code": 13 if state == "FAILED" else 4,
                               "message": "The batch failed." if state == "FAILED" else "The batch expired before it finished."}  # fmt: skip
        return op

    def _finish(self, batch: MockBatch) -> None:
        """Decide every line's outcome once (markers first, then the rates), and count what is paid."""
        rng = random.Random(batch.seed)
        outcomes = []
        with self._content(batch.input_file).open("rb") as f:
            for key, offset in zip(batch.keys, batch.offsets, strict=True):
                f.seek(offset)
                obj = json.loads(f.readline())
                request = obj.get("request") if isinstance(obj, dict) else None
                parts = request.get("contents", [{}])[-1].get("parts", []) if isinstance(request, dict) else []
                prompt = " ".join(p.get("text", "") for p in parts if isinstance(p, dict))
                kind = self.pick(prompt, key)
                outcome = LINE_OUTCOMES.get(kind or "", "ok")
                for line_fault in ("missing", "truncate", "duplicate"):
                    if outcome == "ok" and rng.random() < self._line_rate(line_fault):
                        outcome = line_fault
                outcomes.append(outcome)
        results = None
        if batch.planned == "SUCCEEDED":
            results = MockFile(f"files/batch-{batch.id}", f"results of {batch.display_name}", "application/jsonl", 0, "",
                               time.time(), batch=batch.id)  # fmt: skip
        with self._lock:
            batch.lines = outcomes
            if results is not None:
                batch.results_file = results.name
                self.files[results.name] = results
                self.stats["paid_keys"].update(k for k, o in zip(batch.keys, outcomes, strict=True) if o in _PAID)
        if results is not None:
            self._save(results)
        self._save(batch)

    def batch(self, batch_id: str) -> MockBatch:
        found = self.batches.get(batch_id)
        if found is None:
            raise GoogleError(404, "NOT_FOUND", f"Batch batches/{batch_id} not found.")
        return found

    def listing(self, base: str, page_size: int, token: str | None) -> dict[str, Any]:
        ordered = sorted(self.batches.values(), key=lambda b: (-b.created, b.id))
        start = int(token) if token and token.isdigit() else 0
        page = ordered[start : start + max(1, min(page_size, 100))]
        body: dict[str, Any] = {"operations": [self.view(b, base) for b in page]}
        if start + len(page) < len(ordered):
            body["nextPageToken"] = str(start + len(page))
        return body

    def cancel(self, batch_id: str) -> None:
        batch = self.batch(batch_id)
        with self._lock:
            self.stats["cancels"] += 1
            if batch.live(time.time()):
                batch.cancelled = time.time()
        self._save(batch)

    def delete(self, batch_id: str) -> None:
        self.batch(batch_id)
        with self._lock:
            self.batches.pop(batch_id, None)
        (self.dir / "batches" / f"{batch_id}.json").unlink(missing_ok=True)

    # -- results ----------------------------------------------------------------------------
    def results(self, file: MockFile) -> Iterator[tuple[Generation | dict[str, Any], str, str]]:
        """The lines of a batch's results file, one at a time, in no promised order: (the request as
        a Generation, or the error it gets; its key; its outcome). Missing lines are left out; the
        caller renders each line, cuts off the truncated ones and doubles the duplicates."""
        batch = self.batch(str(file.batch))
        with self._lock:
            self.stats["downloads"] += 1
        assert batch.lines is not None
        order = list(range(len(batch.keys)))
        random.Random(batch.seed + 1).shuffle(order)
        with self._content(batch.input_file).open("rb") as f:
            for i in order:
                outcome = batch.lines[i]
                if outcome == "missing":
                    continue
                f.seek(batch.offsets[i])
                obj = json.loads(f.readline())
                entry: dict[str, Any] = {"inputs": [], "params": {}}
                try:
                    gen: Generation | dict[str, Any] = parse_generate(
                        obj.get("request"), batch.model, entry, self.file_sha
                    )
                except GoogleError as e:
                    gen = line_error(RPC_CODES.get(e.status, 3), e.status, e.message)
                yield gen, batch.keys[i], outcome
