"""The manifest record: one JSON line per finished item, its one typed definition and its checks.

Every writer builds a `Record`; every reader gets records through `parse_line`, which lets
through only lines whose known fields have the right types, so report, gallery, export and
resume can trust what they read. A line that fails the check is damaged: resume sets it
aside, reports count it.

    item_id, prompt_id, prompt, model, image_config {aspect_ratio, image_size}, repeat, vars,
    inputs [{path | url, sha256, mime, bytes, stored}], params,
    status "ok" | "failed", attempts, retried {kind: n}, request_id, usage, cost_usd,
    latency_s, elapsed_s, finished_at, run_id, since_start_s (monotonic seconds from the run's start
    to this line's item finishing), served_model (the model the answer says served it), batch (Google's
    batch that answered it, batch mode only),
    ok:     image_path, mime, bytes, sha256, mtime_ns, width, height, extra_images [...], text,
            recovered (adopted from a whole image on disk after a crash)
    failed: error {kind, status, message}, interrupted (a stop cut its retries short)
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NotRequired, TypedDict, cast

from .models import MODELS, effective_size


class ImageConfigRec(TypedDict):
    aspect_ratio: str | None  # None: none was sent (the model kept the input image's shape)
    image_size: str | None


class InputRec(TypedDict, total=False):
    item_id: str  # an edit chain: the item whose image this is (`path` is then its image in the output dir)
    path: str  # a local reference image, as the spec names it
    url: str  # or an http(s) URL, sent as it is
    sha256: str
    mime: str
    bytes: int
    stored: str  # the copy in the output dir, relative to it: inputs/ab/<sha256>.png


class ImageFile(TypedDict):
    image_path: str  # relative to the output dir
    mime: str
    bytes: int
    sha256: str
    mtime_ns: int | None  # None in remote output dirs
    width: int | None  # read from the image's own header
    height: int | None


class ErrorRec(TypedDict):
    kind: str
    status: int | None
    message: str


class Record(TypedDict):
    item_id: str
    prompt_id: str
    prompt: str
    model: str
    image_config: ImageConfigRec
    repeat: int
    vars: dict[str, str] | None
    status: Literal["ok", "failed"]
    attempts: int
    request_id: str | None
    usage: dict[str, Any] | None
    cost_usd: float
    latency_s: float | None
    elapsed_s: float | None
    finished_at: str
    run_id: str
    since_start_s: NotRequired[float]  # on the monotonic clock: wall times may step (NTP, a VM resumed)
    served_model: NotRequired[str]  # the answer's own `model` (chat) or `modelVersion` (Google), when given
    inputs: NotRequired[list[InputRec]]
    params: NotRequired[dict[str, Any]]
    retried: NotRequired[dict[str, int]]  # failure kinds of the attempts that were retried
    batch: NotRequired[str]  # the batch (batches/...) whose results held this answer: batch mode only
    # status ok
    image_path: NotRequired[str]
    mime: NotRequired[str]
    bytes: NotRequired[int]
    sha256: NotRequired[str]
    mtime_ns: NotRequired[int | None]
    width: NotRequired[int | None]
    height: NotRequired[int | None]
    extra_images: NotRequired[list[ImageFile]]
    text: NotRequired[str]
    recovered: NotRequired[bool]
    # status failed
    error: NotRequired[ErrorRec]
    interrupted: NotRequired[bool]


_ITEM_ID = re.compile(r"[0-9a-f]{1,64}")
# Field -> the types a valid line may hold there (None allowed where listed). Fields not named
# here are carried along unchecked; older lines without the newer fields are valid.
_STR, _INT, _NUM, _OPT = (str,), (int,), (int, float), (type(None),)
_TYPES: dict[str, tuple[type, ...]] = {
    "prompt_id": _STR, "prompt": _STR, "model": _STR, "repeat": _INT, "attempts": _INT,
    "request_id": _STR + _OPT, "usage": (dict, type(None)), "cost_usd": _NUM, "latency_s": _NUM + _OPT,
    "elapsed_s": _NUM + _OPT, "finished_at": _STR, "run_id": _STR, "vars": (dict, type(None)),
    "inputs": (list,), "params": (dict,), "retried": (dict,), "image_path": _STR, "mime": _STR,
    "bytes": _INT, "sha256": _STR, "mtime_ns": _INT + _OPT, "width": _INT + _OPT,
    "height": _INT + _OPT, "extra_images": (list,), "text": _STR, "recovered": (bool,),
    "interrupted": (bool,), "image_config": (dict,), "error": (dict,), "since_start_s": _NUM,
    "served_model": _STR, "batch": _STR,
}  # fmt: skip


def check(obj: Any) -> Record | None:
    """`obj` as a Record if it has the shape of one, else None (a damaged line)."""
    if not isinstance(obj, dict):
        return None
    item_id = obj.get("item_id")
    if not isinstance(item_id, str) or not _ITEM_ID.fullmatch(item_id):
        return None
    status = obj.get("status")
    if status not in ("ok", "failed"):
        return None
    for name, types in _TYPES.items():
        if name in obj:
            value = obj[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                return None
            if isinstance(value, float) and not math.isfinite(value):
                return None
    if status == "ok":
        if not isinstance(obj.get("image_path"), str) or not _image_ok(obj):
            return None
        if any(not isinstance(x, dict) or not _image_ok(x) for x in obj.get("extra_images") or []):
            return None
    else:
        error = obj.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("kind"), str):
            return None
        if error.get("status") is not None and not isinstance(error.get("status"), int):
            return None
        if not isinstance(error.get("message", ""), str):
            return None
    config = obj.get("image_config")
    if config is not None and not isinstance(config.get("aspect_ratio", ""), str | None):
        return None
    if any(not _input_ok(x) for x in obj.get("inputs") or []):
        return None
    return cast(Record, obj)


def _input_ok(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    for name in ("path", "url", "sha256", "mime", "item_id"):
        if name in obj and not isinstance(obj[name], str):
            return False
    if "bytes" in obj and (not isinstance(obj["bytes"], int) or isinstance(obj["bytes"], bool)):
        return False
    return "stored" not in obj or (isinstance(obj["stored"], str) and safe_relpath(obj["stored"]))


def _image_ok(obj: dict[str, Any]) -> bool:
    path = obj.get("image_path")
    return (
        isinstance(path, str)
        and safe_relpath(path)
        and isinstance(obj.get("bytes"), int)
        and not isinstance(obj.get("bytes"), bool)
        and isinstance(obj.get("sha256"), str)
        and isinstance(obj.get("mime", ""), str)
        and all(obj.get(k) is None or (isinstance(obj[k], int) and not isinstance(obj[k], bool))
                for k in ("width", "height", "mtime_ns"))
    )  # fmt: skip


def safe_relpath(path: str) -> bool:
    """A path inside the output dir: relative, no `..`, no control characters (a hand-edited line
    must not point out of the dir, nor break the tab-separated resume index)."""
    return (
        bool(path)
        and not path.startswith(("/", "\\"))
        and not any(ord(c) < 32 for c in path)
        and ".." not in path.replace("\\", "/").split("/")
    )


def parse_line(line: bytes) -> Record | None:
    """One manifest line -> a Record, or None when it is damaged in any way."""
    try:
        return check(json.loads(line))
    except (ValueError, RecursionError):
        return None


Intact = Callable[[Mapping[str, Any]], bool]  # is an ok record's image there and whole?


def latest(records: Iterable[Record], intact: Intact) -> dict[str, Record]:
    """item_id -> the record that counts, by `supersedes` (the input may already be the latest
    ones: then a no-op that never asks `intact`)."""
    last: dict[str, Record] = {}
    for rec in records:
        old = last.get(rec["item_id"])
        if old is None or supersedes(rec["status"], old["status"], functools.partial(intact, old)):
            last[rec["item_id"]] = rec
    return last


def size_of(rec: Record) -> str:
    """The image size a record was produced (and billed) at; the sent value for an unknown model."""
    sent = rec["image_config"].get("image_size") if "image_config" in rec else None
    model = rec.get("model")
    if isinstance(model, str) and model in MODELS:
        return effective_size(model, sent if isinstance(sent, str) else None)
    return str(sent) if sent is not None else "?"


def supersedes(new: str, old: str | None, old_intact: Callable[[], bool]) -> bool:
    """THE rule for which manifest line counts for an item (resume, report, gallery and export all
    use it): does a line of status `new`, read after one of status `old` (None: the first),
    replace it? `old_intact` says whether the old ok line's image is there and whole; it is asked
    only when a failure follows an ok.

    The later line replaces the earlier, except that a failure does not replace an ok whose image
    is intact. An ok item is sent again only when its image went bad, so a failure after an ok
    with a bad image is that redo failing: it counts. A failure after an ok with an intact image
    comes from another manifest (shards, remote parts) whose lines are not in time order with
    this one: the ok stands."""
    return old is None or new == "ok" or old != "ok" or not old_intact()


def images_of(rec: Record) -> list[ImageFile]:
    """Every image of an ok record, the first one first."""
    if rec["status"] != "ok" or "image_path" not in rec:
        return []
    first: ImageFile = {
        "image_path": rec["image_path"],
        "mime": rec.get("mime", ""),
        "bytes": rec.get("bytes", 0),
        "sha256": rec.get("sha256", ""),
        "mtime_ns": rec.get("mtime_ns"),
        "width": rec.get("width"),
        "height": rec.get("height"),
    }
    return [first, *rec.get("extra_images", [])]


def encode(rec: Record | dict[str, Any]) -> bytes:
    """One manifest line (UTF-8). Raises ValueError for a record that cannot be a line (a lone
    surrogate, NaN): what a server sends is made safe before it reaches a record (policy.safe),
    and the writer turns a record that still fails into a failure of that item alone."""
    return json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"


def make_record(
    item_fields: dict[str, Any],
    *,
    status: Literal["ok", "failed"],
    attempts: int,
    request_id: str | None,
    usage: dict[str, Any] | None,
    cost_usd: float,
    latency_s: float | None,
    elapsed_s: float | None,
    finished_at: str,
    run_id: str,
    images: list[ImageFile] | None = None,
    text: str = "",
    error: ErrorRec | None = None,
    retried: dict[str, int] | None = None,
    interrupted: bool = False,
    recovered: bool = False,
    since_start_s: float | None = None,
    served_model: str | None = None,
    batch: str | None = None,
) -> Record:
    """The one place a manifest line is put together: the item's part (Item.record_fields),
    then what became of it."""
    rec: dict[str, Any] = {
        **item_fields,
        "status": status,
        "attempts": attempts,
        "request_id": request_id,
        "usage": usage,
        "cost_usd": round(cost_usd, 6),
        "latency_s": None if latency_s is None else round(latency_s, 3),
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3),
    }
    if retried:
        rec["retried"] = dict(retried)
    if batch is not None:
        rec["batch"] = batch
    if images:
        rec.update(images[0])
        if len(images) > 1:
            rec["extra_images"] = images[1:]
    if text:
        rec["text"] = text
    if recovered:
        rec["recovered"] = True
    if served_model is not None:
        rec["served_model"] = served_model
    if error is not None:
        rec["error"] = error
        if interrupted:
            rec["interrupted"] = True
    rec["finished_at"] = finished_at
    if since_start_s is not None:
        rec["since_start_s"] = round(since_start_s, 3)
    rec["run_id"] = run_id
    return cast(Record, rec)
