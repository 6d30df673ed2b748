"""The dataset card: DEST/README.md with a Hugging Face YAML header, saying truthfully how the data was made.

`summary` carries the run facts from the report (all optional): name, ok, failed,
failures_by_kind, cost_usd, first_finished_at, last_finished_at, runs. What was exported
(models, configs, counts, what was left out) comes from the export itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..output.files import atomic_file
from ..report.summary import Summary
from .common import ExportResult, Selection

CARD = "README.md"
# Failure kinds where the model or its filters declined, as opposed to errors of the service.
REFUSALS = {"content_filter": "image blocked by the safety filter", "prompt_blocked": "prompt refused",
            "no_image": "text answer instead of an image"}  # fmt: skip
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))  # fmt: skip
LOADING = {
    "imagefolder": (
        "import datasets\n"
        'ds = datasets.load_dataset("imagefolder", data_dir="{dest}", split="train")\n'
        'ds[0]["image"], ds[0]["prompt"]'
    ),
    "webdataset": (
        "import datasets\n"
        'ds = datasets.load_dataset("webdataset", data_files="{dest}/shard-*.tar", split="train")\n'
        '# or: import webdataset as wds; wds.WebDataset(sorted(glob.glob("{dest}/shard-*.tar"))).decode("pil")'
    ),
}


def size_category(n: int) -> str:
    return next((label for bound, label in _SIZES if n < bound), "n>100M")


def write_card(
    dest: Path,
    result: ExportResult,
    chosen: Selection,
    summary: Summary | None,
    features: list[dict[str, Any]],
    data_files: str | None = None,
) -> str:
    """Write DEST/README.md (temp file + os.replace); returns its name."""
    text = render(result, chosen, summary, features, data_files)
    with atomic_file(dest / CARD) as f:
        f.write(text.encode("utf-8", "replace"))
    return CARD


def render(
    result: ExportResult,
    chosen: Selection,
    report: Summary | None,
    features: list[dict[str, Any]],
    data_files: str | None = None,
) -> str:
    from .. import __version__

    summary: dict[str, Any] = dict(report) if report else {}  # the card says less without the report's facts
    has_inputs = any(rec.get("inputs") for rec in chosen.records)
    name = str(summary.get("name") or result.dest.name)
    meta: dict[str, Any] = {
        "pretty_name": name,
        "task_categories": ["image-to-image" if has_inputs else "text-to-image"],
        "size_categories": [size_category(result.written)],
        "tags": ["synthetic", "image-generation", "gemini", "nano-banana"],
    }
    if data_files:
        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}]
    meta["dataset_info"] = {"features": features}
    header = (
        "---\n"
        "# FILL IN the license you publish this dataset under (e.g. cc-by-4.0) and check the terms of the\n"
        "# image model's provider for generated images; `unknown` is a placeholder.\n"
        "license: unknown\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"
    )
    lines = [
        f"# {name}",
        "",
        f"{result.written:,} synthetic images generated from text prompts"
        + (" and reference images" if has_inputs else "")
        + f' by Google\'s Gemini image models ("Nano Banana"), exported as {result.format}.',
        "",
        "## Models and image configs",
        "",
        "| model | aspect ratio | image size | images |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {a} | {s} | {n:,} |" for (m, a, s), n in sorted(chosen.models.items())]
    lines += ["", "## How it was made", ""]
    ok, failed = summary.get("ok"), summary.get("failed")
    if ok is not None and failed is not None:
        lines.append(f"- Items requested: {ok + failed:,}; succeeded: {ok:,}; failed: {failed:,}.")
    lines.append(f"- Images in this export: {result.written:,}.")
    stamps = sorted(str(rec["finished_at"]) for rec in chosen.records if rec.get("finished_at"))
    first = summary.get("first_finished_at") or (stamps[0] if stamps else None)
    last = summary.get("last_finished_at") or (stamps[-1] if stamps else None)
    if first or last:
        lines.append(f"- Generated between {first or '?'} and {last or '?'} (UTC).")
    if summary.get("runs") is not None:
        lines.append(f"- Runs (resumed sessions): {summary['runs']}.")
    if summary.get("cost_usd") is not None:
        lines.append(f"- Cost: ${float(summary['cost_usd']):,.2f} (every attempt, as priced by the runner).")
    else:
        spent = sum(float(rec.get("cost_usd") or 0) for rec in chosen.records)
        lines.append(f"- Cost of the exported images: ${spent:,.2f} (their last attempts, as priced by the runner).")
    kinds: dict[str, int] = summary.get("failures_by_kind") or {}
    if kinds:
        lines += [
            "",
            "Failures by kind (items that ended without an image):",
            "",
            "| kind | items | |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {n:,} | {'refusal: ' + REFUSALS[k] if k in REFUSALS else ''} |" for k, n in kinds.items()]
        refusals = sum(n for k, n in kinds.items() if k in REFUSALS)
        lines += ["", f"Refusals (the model or its filters declined): {refusals:,}."]
    lines += ["", "## Left out of this export", ""]
    if chosen.duplicates_removed:
        lines.append(
            f"- Byte-identical duplicates removed: {chosen.duplicates_removed:,} (the first of each group kept)."
        )
    for reason, count in sorted(result.skipped.items()):
        if reason != "duplicate":
            lines.append(f"- {reason.replace('_', ' ')}: {count:,}")
    if not result.skipped:
        lines.append("- Nothing.")
    lines += [
        "",
        "## Watermark",
        "",
        "Every image was generated by a Google Gemini image model and carries Google's SynthID invisible",
        "watermark, which identifies it as AI-generated. Keep it that way: do not try to remove it.",
        "",
        "## Fields",
        "",
    ]
    lines += [f"- `{f['name']}`: {_kind(f)}" for f in features]
    lines += ["", "## Loading", "", "```python", LOADING[result.format].format(dest=result.dest.as_posix()), "```"]
    lines += [
        "",
        "## Generator",
        "",
        f"Made with runner {__version__} (prompts in a YAML job spec, sent to an image",
        "generation gateway; one manifest line per image with its request, usage and cost).",
    ]
    if result.warnings:
        lines += ["", "## Notes", ""] + [f"- {w}" for w in result.warnings]
    return header + "\n".join(lines) + "\n"


def _kind(feature: dict[str, Any]) -> str:
    if "dtype" in feature:
        return str(feature["dtype"])
    if "list" in feature:
        inner = feature["list"]
        return f"list of {inner if isinstance(inner, str) else 'struct'}"
    return "struct"
