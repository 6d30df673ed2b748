"""What the mock's Files and Batch APIs keep (a file, a batch, an upload under way) and the shape of a results line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .google import now_iso


@dataclass
class MockFile:
    name: str  # files/<id>
    display_name: str
    mime: str
    size: int
    sha256: str
    created: float
    batch: str | None = None  # the results file of this batch (generated as it is downloaded)

    def resource(self, base: str) -> dict[str, Any]:
        return {
            "name": self.name, "displayName": self.display_name, "mimeType": self.mime, "sizeBytes": str(self.size),
            "createTime": now_iso(self.created), "updateTime": now_iso(self.created),
            "expirationTime": now_iso(self.created + 48 * 3600), "sha256Hash": self.sha256, "uri": f"{base}/{self.name}",
            "state": "ACTIVE", "source": "GENERATED" if self.batch else "UPLOADED",
            **({"downloadUri": f"{base.rsplit('/', 1)[0]}/download/v1beta/{self.name}:download?alt=media"} if self.batch else {}),
        }  # fmt: skip


@dataclass
class MockBatch:
    id: str
    display_name: str
    model: str
    model_id: str
    input_file: str
    created: float
    latency_s: float
    keys: list[str]
    offsets: list[int]  # of each input line in the input file
    tokens: int
    planned: str  # the state it ends in: SUCCEEDED, FAILED or EXPIRED
    seed: int
    cancelled: float | None = None
    lines: list[str] | None = None  # each line's outcome, decided once when it ends
    results_file: str | None = None

    def state(self, now: float) -> str:
        if self.cancelled is not None:
            return "CANCELLED"
        if now < self.created + self.latency_s * 0.25:
            return "PENDING"
        if now < self.created + self.latency_s:
            return "RUNNING"
        if self.planned != "SUCCEEDED":
            return self.planned
        errors = any(o.startswith("error:") for o in self.lines or [])
        return "PARTIALLY_SUCCEEDED" if errors else "SUCCEEDED"

    def live(self, now: float) -> bool:
        return self.state(now) in ("PENDING", "RUNNING")


@dataclass
class Upload:
    display_name: str
    mime: str
    size: int
    path: Path
    received: int = 0


def results_line(key: str, position: int, response: bytes | None = None, error: dict[str, Any] | None = None) -> bytes:
    """One results line, without its newline: the key first on even positions, last on odd ones
    (Google promises neither, so the reader must not depend on it)."""
    body = json.dumps({"error": error}).encode()[1:-1] if error is not None else b'"response": ' + (response or b"{}")
    keyed = b'"key": ' + json.dumps(key).encode()
    return b"{" + (keyed + b", " + body if position % 2 == 0 else body + b", " + keyed) + b"}"
