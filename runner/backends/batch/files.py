"""A batch's two files on this machine: its requests written as JSONL one line at a time, its results read one line at a time.

Both run in the sink's threads: a results line is ~3.5 MB of base64 per 1K image, and a results
file of 100 of them is read, decoded and saved without ever holding more than one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from ...gateway.answer import Outcome
from ...gateway.gemini import GeminiFormat, read_results_line
from ...policy import Failure
from ...spec.inputs import Inputs
from ...spec.items import Item

_KEY_AT_START = re.compile(rb'^\s*\{\s*"key"\s*:\s*"([0-9a-f]{1,64})"')
_KEY_AT_END = re.compile(rb'"key"\s*:\s*"([0-9a-f]{1,64})"\s*\}\s*$')
MAX_LINE = 256 << 20  # a results line past this is not an image generation: read no further into it


def write_requests(
    path: Path, items: Iterable[Item], request_format: GeminiFormat, inputs: Inputs, file_uris: Mapping[str, str]
) -> int:
    """Write `{"key": item_id, "request": GenerateContentRequest}` lines; returns the bytes written.

    Reference images that were uploaded once go as `fileData` (their sha256 in `file_uris`), so an
    image used by every item is not inlined in every line."""
    size = 0
    with path.open("wb") as f:
        for item in items:
            line = json.dumps({"key": item.item_id, "request": request_format.request(item, inputs, file_uris)},
                              ensure_ascii=False).encode() + b"\n"  # fmt: skip
            f.write(line)
            size += len(line)
    return size


class ResultsReader:
    """The lines of a downloaded results file, one at a time (a thread calls `next`)."""

    def __init__(self, path: Path, api_key: str | None, max_line: int = MAX_LINE) -> None:
        self._f: BinaryIO = path.open("rb")
        self._key = api_key
        self._max = min(max_line + 4096, MAX_LINE)  # an answer of max_response_mb, and its key and framing

    def close(self) -> None:
        self._f.close()

    def next(self) -> tuple[str | None, Outcome | None] | None:
        """(key, outcome) of the next line; (key or None, None) for a line that is cut off or not a
        results line (its key, where it can be read, is then not done); None at the end."""
        line = self._f.readline(self._max)
        while line and not line.strip():
            line = self._f.readline(self._max)
        if not line:
            return None
        if not line.endswith(b"\n") and len(line) >= self._max:
            tail = line
            while rest := self._f.readline(self._max):  # skip the rest of a line too long to be an answer
                tail = rest
                if rest.endswith(b"\n"):
                    break
            key = _key_of(line) or _key_of(tail[-200:])
            if key is None:
                return None, None
            # As an interactive answer over max_response_mb: failed, not bought again in this run.
            return key, too_big_line(self._max)
        try:
            return parse_line(line, self._key)
        except Exception as e:  # a reader's bug costs its line, never the batch (nor every later run)
            why = f"the results line could not be read: {type(e).__name__} (a bug in runner; the line was left out)"
            return _key_of(line), Failure("internal", None, why)


def too_big_line(cap: int) -> Failure:
    return Failure(
        "invalid_response", None,
        f"answer larger than max_response_mb ({cap / 2**20:.0f} MB) in the results file; raise max_response_mb "
        "if images are that big", final=True,  # it would come back as big: not bought again in this run
    )  # fmt: skip


def parse_line(line: bytes, api_key: str | None) -> tuple[str | None, Outcome | None]:
    """One results line -> (key, Outcome): its `response` read exactly as an interactive answer is
    (the base64 cut out of the raw line and decoded in steps), its `error` as the same error with
    its HTTP status. A line that does not parse is (its key where it can be read, None): not done."""
    outcome = read_results_line(line, api_key)
    return outcome if outcome is not None else (_key_of(line), None)


def _key_of(line: bytes) -> str | None:
    m = _KEY_AT_START.match(line) or _KEY_AT_END.search(line[-200:])
    return m.group(1).decode() if m else None
