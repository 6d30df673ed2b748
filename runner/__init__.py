"""runner: turn a YAML job spec into an image dataset through the Nano Banana gateway."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# The public API, imported on first use: `runner --help` should not pay for httpx and tenacity.
_EXPORTS = {
    "Item": "spec", "Shard": "spec", "iter_items": "spec",
    "JobSpec": "spec", "load_spec": "spec",
    "RunOptions": "engine.job", "RunResult": "engine.job", "run_job": "engine.job", "run_job_async": "engine.job",
    "PriceTable": "pricing", "estimate": "engine.plan", "Record": "record",
    "RunnerError": "errors", "SpecError": "errors", "UsageError": "errors", "RunAborted": "errors",
    "OutputError": "errors", "OutputLocked": "errors",
}  # fmt: skip
__all__ = [
    "Item", "JobSpec", "OutputError", "OutputLocked", "PriceTable", "Record", "RunAborted", "RunOptions",
    "RunResult", "RunnerError", "Shard", "SpecError", "UsageError", "estimate", "iter_items", "load_spec",
    "run_job", "run_job_async",
]  # fmt: skip

if TYPE_CHECKING:
    from .engine.job import RunOptions, RunResult, run_job, run_job_async
    from .engine.plan import estimate
    from .errors import OutputError, OutputLocked, RunAborted, RunnerError, SpecError, UsageError
    from .pricing import PriceTable
    from .record import Record
    from .spec.items import Item, Shard, iter_items
    from .spec.parse import JobSpec, load_spec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
