"""The results writer: each item's images saved durably and its outcome made a manifest line; lines appended in batches."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..gateway.answer import Outcome, Success
from ..imageinfo import dimensions, is_whole_image
from ..output import MIME_TYPES, Store, image_relpath
from ..pricing import PriceTable
from ..record import ErrorRec, ImageFile, Record, encode, make_record
from ..spec.items import Item

OnBug = Callable[[BaseException, str], str]  # (exception, what was being done) -> where the details went


@dataclass
class Finished:
    """An item done with its attempts, ready to be saved and recorded."""

    item: Item
    outcome: Outcome
    attempts: int
    latency: float
    elapsed: float
    cost: float
    retried: Counter[str]
    interrupted: bool = False
    batch: str | None = None  # the batch that answered it (batch mode)


class Writer:
    """What the pool's threads do with a finished item: save, record, append. Thread-safe:
    several items are saved at once, and the pool's one writer task commits the lines."""

    def __init__(self, store: Store, prices: PriceTable, run_id: str, on_bug: OnBug) -> None:
        self.store = store
        self.prices = prices
        self.run_id = run_id
        self.on_bug = on_bug
        self.started = time.monotonic()  # lines say when on this clock too: the wall clock may step
        self._stored_inputs: set[str] = set()
        self._inputs_lock = threading.Lock()

    def commit(self, records: list[Record], now: bool = False) -> list[Record]:
        """Append a batch's lines in one write (their images are already durable). A record that
        cannot be encoded becomes an `internal` failure of its item alone, never the batch's."""
        lines = []
        for i, rec in enumerate(records):
            try:
                lines.append(encode(rec))
            except ValueError as e:  # a lone surrogate or NaN that slipped past: that record only
                fields = {k: rec.get(k) for k in _ITEM_FIELDS}
                records[i] = rec = self.bug_record(fields, e, rec.get("attempts", 0))
                lines.append(encode(rec))
        self.store.append(records, lines, now)
        return records

    def record(self, f: Finished) -> Record:
        """Save the item's images (each durable before this returns) and build its line; in a thread."""
        outcome = f.outcome
        images: list[ImageFile] = []
        error: ErrorRec | None = None
        if isinstance(outcome, Success):
            for i, image in enumerate(outcome.images):
                rel = image_relpath(f.item.item_id, image.mime, i)
                sha, mtime_ns = self.store.save_image(rel, image.data)
                size = dimensions(image.data, image.mime)
                images.append({"image_path": rel, "mime": image.mime, "bytes": len(image.data), "sha256": sha,
                               "mtime_ns": mtime_ns, "width": size[0] if size else None,
                               "height": size[1] if size else None})  # fmt: skip
            for ref in f.item.inputs:
                if ref.stored is not None and ref.path is not None:
                    with self._inputs_lock:  # saver threads share reference images: each is stored once
                        if ref.stored not in self._stored_inputs:
                            self.store.save_input(ref.stored, ref.path, ref.size)
                            self._stored_inputs.add(ref.stored)
        else:
            error = {"kind": outcome.kind, "status": outcome.status, "message": outcome.message}
        return make_record(
            f.item.record_fields(),
            status="ok" if images else "failed",
            attempts=f.attempts,
            request_id=outcome.request_id,
            usage=outcome.usage if isinstance(outcome, Success) else None,
            cost_usd=f.cost,
            latency_s=f.latency,
            elapsed_s=f.elapsed,
            finished_at=_now(),
            run_id=self.run_id,
            since_start_s=time.monotonic() - self.started,
            served_model=outcome.model if isinstance(outcome, Success) else None,
            images=images,
            text=outcome.text if isinstance(outcome, Success) else "",
            error=error,
            retried=dict(f.retried),
            interrupted=f.interrupted,
            batch=f.batch,
        )

    def bug_record(self, fields: dict[str, Any], e: Exception, attempts: int) -> Record:
        where = self.on_bug(e, f"recording item {fields.get('item_id')}")
        message = f"internal error: {type(e).__name__} (details in {where})"
        error: ErrorRec = {"kind": "internal", "status": None, "message": message}
        return make_record(
            fields, status="failed", attempts=attempts, request_id=None, usage=None, cost_usd=0.0,
            latency_s=0.0, elapsed_s=0.0, finished_at=_now(), run_id=self.run_id, error=error,
            since_start_s=time.monotonic() - self.started,
        )  # fmt: skip

    def recovered(self, item: Item, paths: list[str]) -> Record | None:
        """The record of an item whose images were saved whole before a crash took its line, or
        None when its first image is not whole (then it is bought again). In a thread."""
        images: list[ImageFile] = []
        for rel in sorted(paths, key=lambda p: (len(p), p)):  # the first image, then -1, -2, ...
            mime = MIME_TYPES[rel.rsplit(".", 1)[-1]]
            data = self.store.read_image(rel)
            if data is None or not is_whole_image(mime, data):
                break
            size = dimensions(data, mime)
            images.append({"image_path": rel, "mime": mime, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "mtime_ns": None, "width": size[0] if size else None,
                           "height": size[1] if size else None})  # fmt: skip
        if not images or not images[0]["image_path"].rsplit(".", 1)[0].endswith(item.item_id):
            return None
        return make_record(
            item.record_fields(), status="ok", attempts=0, request_id=None, usage=None,
            cost_usd=self.prices.item(item) * len(images), latency_s=0.0, elapsed_s=0.0, finished_at=_now(),
            run_id=self.run_id, images=images, recovered=True, since_start_s=time.monotonic() - self.started,
        )  # fmt: skip


_ITEM_FIELDS = ("item_id", "prompt_id", "prompt", "model", "image_config", "repeat", "vars")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
