"""runner: turn a YAML job spec into an image dataset through the Nano Banana gateway."""

from .errors import OutputError, OutputLocked, RunAborted, RunnerError, SpecError, UsageError
from .items import Item, Shard, iter_items
from .job import RunOptions, RunResult, run_job, run_job_async
from .pricing import PriceTable, estimate
from .spec import JobSpec, load_spec

__all__ = [
    "Item",
    "JobSpec",
    "OutputError",
    "OutputLocked",
    "PriceTable",
    "RunAborted",
    "RunOptions",
    "RunResult",
    "RunnerError",
    "Shard",
    "SpecError",
    "UsageError",
    "estimate",
    "iter_items",
    "load_spec",
    "run_job",
    "run_job_async",
]
__version__ = "0.1.0"
