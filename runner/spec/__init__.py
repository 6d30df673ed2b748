"""The job spec: YAML read once, checked into frozen dataclasses, expanded lazily into items with stable ids."""

from .items import Item, Shard, item_id, iter_items
from .parse import JobSpec, load_spec, parse_spec, spec_summary
from .values import ImageConfig, Params

__all__ = [
    "ImageConfig", "Item", "JobSpec", "Params", "Shard", "item_id", "iter_items", "load_spec", "parse_spec",
    "spec_summary",
]  # fmt: skip
