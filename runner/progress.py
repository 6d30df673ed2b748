"""The progress bar of a run: items done, ok / failed / retries and money spent so far."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Bar:
    def __init__(self, total: int, enabled: bool, desc: str = "images") -> None:
        self.ok = self.failed = self.retries = 0
        self.spent = 0.0
        self._bar = tqdm(total=total, disable=not enabled, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)

    def record(self, rec: dict[str, Any], spent_usd: float) -> None:
        if rec["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.spent = spent_usd
        self._bar.update(1)
        self._postfix()

    def retry(self) -> None:
        self.retries += 1
        self._postfix()

    def _postfix(self) -> None:
        self._bar.set_postfix_str(
            f"ok={self.ok} failed={self.failed} retries={self.retries} ${self.spent:.2f}", refresh=False
        )

    def write(self, message: str) -> None:
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
