"""What a run sends, in the order it can go: the plan's items, and an edit chain's children as their parents' images are saved.

A backend takes items with `next()`; when that gives None but the feed is not `exhausted` (a
parent in flight may still have children), it `await`s `wait()`. Every item taken is given
back with `finished(item, record)`: an ok parent's children are planned from its record at once
(its image is saved and whole by then), ahead of the remaining roots, so a 3-step chain of
10,000 roots edits the first images while the last roots are still being made, and the children
waiting are at most those of the parents in flight. Without chains `next` is the plan's
iterator and `finished` does nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import anyio

from ..record import Record
from ..spec.items import Item, iter_children, parent_image
from ..spec.parse import JobSpec

Pending = Callable[[int], bool]  # will this run send the item with this id (as an integer)?


class Feed:
    def __init__(
        self,
        items: Iterator[Item],
        spec: JobSpec | None = None,
        pending: Pending | None = None,
        on_planned: Callable[[int], None] | None = None,
    ) -> None:
        self._items = items
        self._spec = spec if spec is not None and spec.chained else None
        self._parents = {p.link.parent for p in self._spec.prompts if p.link is not None} if self._spec else set()
        self._pending = pending or (lambda key: True)
        self._on_planned = on_planned or (lambda n: None)
        self._queue: deque[Item] = deque()
        self._seen: set[int] = set()  # children planned in this run (two identical parents give one child)
        self.planned: dict[str, Item] = {}  # children planned and not yet finished (a batch holds only their ids)
        self._in_flight: set[str] = set()  # parents taken and not yet finished: their children may still come
        self._done = False
        self._changed = anyio.Event()
        self.blocked = 0  # children not planned: their parent failed

    def next(self) -> Item | None:
        """The next item to send, or None (for now: see `exhausted`). Children go first."""
        if self._queue:
            item = self._queue.popleft()
        else:
            taken = next(self._items, None)
            if taken is None:
                self._done = True
                return None
            item = taken
        if item.prompt_id in self._parents:
            self._in_flight.add(item.item_id)
        return item

    @property
    def ready(self) -> bool:
        """Is a child waiting to be taken?"""
        return bool(self._queue)

    @property
    def exhausted(self) -> bool:
        """Nothing more will come: the plan is through and no parent in flight can add children."""
        return self._done and not self._queue and not self._in_flight

    async def wait(self) -> None:
        """Until the next item is ready, or the feed is exhausted."""
        if self._queue or self.exhausted:
            return
        await self._changed.wait()  # every waiter on the one event; _notify replaces it after setting it

    def finished(self, item: Item, record: Record | None) -> None:
        """An item is done (`record` None: nothing was recorded). An ok parent's children are planned
        now, whether this run took it or it came back from an earlier run's batch."""
        if self._spec is None:
            return
        self.planned.pop(item.item_id, None)
        if item.prompt_id not in self._parents:
            return
        self._in_flight.discard(item.item_id)
        if record is not None and record["status"] == "ok":
            image = parent_image(
                item.item_id, record["image_path"], record["sha256"], record.get("mime", ""), record.get("bytes", 0)
            )
            planned = 0
            for fields in iter_children(self._spec, item, image):
                key = int(fields.item_id, 16)
                if key in self._seen or not self._pending(key):
                    continue
                self._seen.add(key)
                child = Item(*fields)
                self._queue.append(child)
                self.planned[child.item_id] = child
                planned += 1
            if planned:
                self._on_planned(planned)
        elif record is not None:
            self.blocked += 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def stop(self) -> None:
        """Nothing more is taken (a stop): wake whoever waits."""
        self._done = True
        self._queue.clear()
        self._in_flight.clear()
        self._notify()
