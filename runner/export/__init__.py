"""Deliver a run's images as a dataset: Hugging Face imagefolder or WebDataset shards, with a dataset card.

    from runner.export import Filters, export_imagefolder, export_webdataset
    from runner.output.source import LocalSource
    result = export_webdataset(records, LocalSource(out), Path("dist"), shard_size=1000,
                               filters=Filters(exclude_duplicates=True), summary=summary)

Both take the records (any order; the latest of each item counts), an ImageSource to read the
files from, and a local destination; both stream one item at a time and return an ExportResult
(what was written, what was skipped and why).
"""

from .card import CARD, render, size_category, write_card
from .common import ExportResult, Filters
from .dataset import FORMATS, export_dataset
from .imagefolder import METADATA, export_imagefolder, var_columns
from .webdataset import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, export_webdataset, shard_name

__all__ = [
    "CARD",
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "METADATA",
    "ExportResult",
    "Filters",
    "export_dataset",
    "export_imagefolder",
    "export_webdataset",
    "render",
    "shard_name",
    "size_category",
    "var_columns",
    "write_card",
]
