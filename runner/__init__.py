"""runner: turn a YAML job spec into an image dataset through the Nano Banana gateway."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# The public API, imported on first use: `runner --help` should not pay for httpx and tenacity.
_EXPORTS = {
    "Item": "items", "Shard": "items", "iter_items": "items",
    "JobSpec": "spec", "load_spec": "spec",
    "RunOptions": "job", "RunResult": "job", "run_job": "job", "run_job_async": "job",
    "PriceTable": "pricing", "estimate": "plan", "Record": "record",
    "RunnerError": "errors", "SpecError": "errors", "UsageError": "errors", "RunAborted": "errors",
    "OutputError": "errors", "OutputLocked": "errors",
}  # fmt: skip
__all__ = [
    "Item", "JobSpec", "OutputError", "OutputLocked", "PriceTable", "Record", "RunAborted", "RunOptions",
    "RunResult", "RunnerError", "Shard", "SpecError", "UsageError", "estimate", "iter_items", "load_spec",
    "run_job", "run_job_async",
]  # fmt: skip

if TYPE_CHECKING:
    from .errors import OutputError, OutputLocked, RunAborted, RunnerError, SpecError, UsageError
    from .items import Item, Shard, iter_items
    from .job import RunOptions, RunResult, run_job, run_job_async
    from .plan import estimate
    from .pricing import PriceTable
    from .record import Record
    from .spec import JobSpec, load_spec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
