"""The dataset card: DEST/README.md with a Hugging Face YAML header, saying truthfully how the data was made.

`summary` carries the run facts from the report (all optional): name, ok, failed,
failures_by_kind, cost_usd, first_finished_at, last_finished_at, runs, spec_items,
older_records, records_note, made_by_mock, sources. What was exported (models, configs, counts,
labels, the filter, what was left out) comes from the export itself.

Where the images came from decides what the card claims: images of the built-in mock are test
patterns (said plainly, no watermark claimed); images from a gateway or Google's API came from
Google's Gemini models, which watermark every image with SynthID. Every text from the records
(the dataset's name, labels, values) is escaped for Markdown, and written in YAML so that it
reads back exactly (one line, whatever it holds).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..output.files import atomic_file
from ..report.shapes import Summary
from ..spec.parse import GOOGLE_API_HOST
from .common import ExportResult, Selection

CARD = "README.md"
# Failure kinds where the model or its filters declined, as opposed to errors of the service.
REFUSALS = {"content_filter": "image blocked by the safety filter", "prompt_blocked": "prompt refused",
            "no_image": "text answer instead of an image"}  # fmt: skip
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))  # fmt: skip
MODEL_NAMES = {"nanobanana": "Gemini 2.5 Flash Image", "nanobanana_pro": "Gemini 3 Pro Image",
               "nanobanana_2": "Gemini 3.1 Flash Image"}  # fmt: skip
MAX_VALUES = 30  # label values listed per label
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
# What each field holds: (for any dataset, for an edit dataset); None: the same.
MEANINGS: dict[str, tuple[str, str | None]] = {
    "image": ("the generated image", "the result: the image the model made from the source image(s) and the instruction"),
    "item_id": ("runner's id of the request: a hash of exactly what was asked (model, prompt, image config, repeat, "
                "reference images by content, params)", None),
    "prompt_id": ("the id of the prompt (or template, or prompt-file row) of the job spec the request came from", None),
    "prompt": ("the text sent to the model", "the instruction: the text sent with the source image(s)"),
    "model": ("runner's model name: " + ", ".join(f"{k} = {v}" for k, v in MODEL_NAMES.items()), None),
    "aspect_ratio": ("the aspect ratio asked for; null: none was sent, and the model kept the shape of the first "
                     "reference image (a square without one)", None),
    "image_size": ("the image size asked for (512, 1K, 2K, 4K); null: none was sent, and the model made its "
                   "default", None),
    "repeat": ("which of the prompt's repeats this is, from 0; an integer seed is sent as seed + repeat", None),
    "width": ("the image's width in pixels, read from the file", None),
    "height": ("the image's height in pixels, read from the file", None),
    "params": ("the request parameters as sent (seed, temperature, top_p), as JSON text", None),
    "input_images": ("the reference images sent with the prompt, in order",
                     "the source image(s): what the model was given to edit, before the edit, in order"),
    "input_urls": ("reference images given by URL (fetched by the gateway; not part of this dataset)", None),
    "source_item_id": ("an edit chain: the item_id of the row whose image this one edited (null for a first step)",
                       "an edit chain: the item_id of the row whose result is this row's source image (null when "
                       "the source is a reference image of the spec, not an image the job made)"),
    "extra_images": ("further images the same answer held", None),
    "__key__": ("the sample's key: its item_id", None),
    "__url__": ("the shard the sample was read from", None),
    "json": ("the request and its record: item_id, prompt_id, prompt, model, image_config, repeat, width, height, "
             "mime, sha256, bytes, image_file (the image's member), vars (the labels), params, inputs (each reference "
             "image: path or url, sha256, mime, its member `file` and that member's `file_mime`, and item_id: the row whose "
             "result it is, in an edit chain), extra_images, usage "
             "(as the API returned it), cost_usd, latency_s, finished_at, run_id, request_id", None),
}  # fmt: skip

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|!~&#])")  # what Markdown or HTML acts on inside a line


def md(text: Any) -> str:
    """Text from the records as inert Markdown on one line: control characters and line breaks become
    spaces, every character Markdown or HTML could act on is escaped."""
    return _MARKDOWN.sub(r"\\\1", _UNSAFE.sub(" ", str(text)))


def code(text: Any) -> str:
    """A name as a Markdown code span that holds it whatever it holds (backticks included)."""
    clean = _UNSAFE.sub(" ", str(text))
    fence = "`" * (max((len(m) for m in re.findall("`+", clean)), default=0) + 1)
    pad = " " if clean.startswith("`") or clean.endswith("`") or not clean.strip() else ""
    return f"{fence}{pad}{clean}{pad}{fence}"


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks or other unprintable characters as one double-quoted, escaped line:
    a name holding a newline (or `---`) cannot end the YAML header or the card's front matter."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if not data.isprintable() or _UNSAFE.search(data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')
    return dumper.represent_str(data)


_Dumper.add_representer(str, _str)


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


def origin(summary: dict[str, Any]) -> str:
    """Where the images came from: `mock`, `google` (Google's API directly), `gateway`, or `unknown`."""
    sources = summary.get("sources") or []
    if summary.get("made_by_mock") or any(s.get("base_url") == "mock" for s in sources):
        return "mock"
    if not sources:
        return "unknown"
    hosts = {urlsplit(str(s.get("base_url", ""))).hostname for s in sources}
    formats = {s.get("api_format") for s in sources}
    return "google" if hosts == {GOOGLE_API_HOST} and formats == {"gemini"} else "gateway"


def _where_from(kind: str, summary: dict[str, Any]) -> list[str]:
    sources = summary.get("sources") or []
    if kind == "mock":
        return [
            "**These images were made by runner's built-in mock gateway** (`runner run --mock`): generated test",
            "patterns, not the output of an image model. They show the shape of the dataset; they are not a",
            "dataset of generated images and carry no watermark. Run the job against a real gateway to make one.",
        ]
    if kind == "unknown":
        return [
            "Where the images were made was not recorded (an output dir written before runner recorded it): they",
            "came from whatever gateway the job spec named at the time.",
        ]
    lines = []
    for s in sources:
        host = urlsplit(str(s.get("base_url", ""))).hostname or "?"
        how = (
            "Google's Gemini API directly"
            if host == GOOGLE_API_HOST and s.get("api_format") == "gemini"
            else f"the gateway at {md(host)} (api\\_format {md(s.get('api_format', '?'))}), which serves them"
        )
        lines.append(f"- From Google's Gemini image models, through {how}.")
    return lines


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
    # an edit dataset: the reference images are part of it (input_images, or input0.png members)
    edit = any(f["name"] == "input_images" or f["name"].startswith("input0.") for f in features)
    name = str(summary.get("name") or result.dest.name)
    kind = origin(summary)
    models = sorted({m for m, _, _ in chosen.models})
    meta: dict[str, Any] = {
        "pretty_name": _UNSAFE.sub(" ", name).strip() or "dataset",
        "task_categories": ["image-to-image" if has_inputs else "text-to-image"],
        "size_categories": [size_category(result.written)],
        "tags": ["synthetic", "runner-mock", "not-model-output"]
        if kind == "mock"
        else ["synthetic", "image-generation", "gemini", "nano-banana"],
    }
    if data_files:
        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}]
    meta["dataset_info"] = {"features": features}
    header = (
        "---\n"
        "# FILL IN the license you publish this dataset under (e.g. cc-by-4.0) and check the terms of the\n"
        "# image model's provider for generated images; `unknown` is a placeholder.\n"
        "license: unknown\n"
        + yaml.dump(meta, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        + "---\n"
    )
    made_by = {
        "mock": "by runner's built-in mock gateway (test patterns, not model output)",
        "google": "by Google's Gemini image models (\"Nano Banana\") through Google's Gemini API",
        "gateway": 'by Google\'s Gemini image models ("Nano Banana") through a gateway',
        "unknown": "by an image generation gateway (not recorded which)",
    }[kind]
    lines = [
        f"# {md(name)}",
        "",
        f"{result.written:,} synthetic images generated from text prompts"
        + (" and reference images" if has_inputs else "")
        + f" {made_by}, exported as {result.format}.",
        "",
        "## Where the images came from",
        "",
        *_where_from(kind, summary),
        "",
        "## Models and image configs",
        "",
        "| model | aspect ratio | image size | images |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {md(m)} ({md(MODEL_NAMES.get(m, '?'))}) | {md(a) if a else 'none sent: the input image' + chr(39) + 's shape'} "
        f"| {md(s)} | {n:,} |"
        for (m, a, s), n in sorted(chosen.models.items())
    ]
    lines += ["", "## What is in this export", ""]
    if summary.get("spec_items") is not None and summary.get("older_records") is not None:
        lines.append(
            f"- Items: the {summary['spec_items']:,} items the job spec asks for now"
            + (
                f"; {summary['older_records']:,} older items whose records the spec no longer asks for "
                "(a changed reference image, a removed row) are left out"
                if summary["older_records"]
                else ""
            )
            + "."
        )
    elif summary.get("records_note"):
        lines.append(f"- Items: {md(summary['records_note'])}.")
    lines.append(f"- Filter: {code(chosen.filters.describe()) if chosen.filters.describe() != 'none' else 'none'}.")
    lines.append(f"- Images in this export: {result.written:,}.")
    lines += ["", "## How it was made", ""]
    ok, failed = summary.get("ok"), summary.get("failed")
    if ok is not None and failed is not None:
        line = f"- Items requested: {ok + failed:,}; succeeded: {ok:,}; failed: {failed:,}"
        left = (summary.get("spec_items") or 0) - (ok + failed)
        lines.append(
            line + (f"; not yet run: {left:,}." if left > 0 and summary.get("older_records") is not None else ".")
        )
    stamps = sorted(str(rec["finished_at"]) for rec in chosen.records if rec.get("finished_at"))
    first = summary.get("first_finished_at") or (stamps[0] if stamps else None)
    last = summary.get("last_finished_at") or (stamps[-1] if stamps else None)
    if first or last:
        lines.append(f"- Generated between {md(first or '?')} and {md(last or '?')} (UTC).")
    if summary.get("runs") is not None:
        lines.append(f"- Runs (resumed sessions): {summary['runs']}.")
    if summary.get("cost_usd") is not None:
        what = "nothing was paid: the mock is free" if kind == "mock" else "every attempt, as priced by the runner"
        lines.append(f"- Cost: ${float(summary['cost_usd']):,.2f} ({what}).")
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
        lines += [
            f"| {md(k)} | {n:,} | {'refusal: ' + REFUSALS[k] if k in REFUSALS else ''} |" for k, n in kinds.items()
        ]
        refusals = sum(n for k, n in kinds.items() if k in REFUSALS)
        lines += ["", f"Refusals (the model or its filters declined): {refusals:,}."]
    lines += _labels(chosen)
    lines += ["", "## Left out of this export", ""]
    if chosen.duplicates_removed:
        lines.append(
            f"- Byte-identical duplicates removed: {chosen.duplicates_removed:,} (the first of each group kept)."
        )
    for reason, count in sorted(result.skipped.items()):
        if reason != "duplicate":
            lines.append(f"- {reason.replace('_', ' ')}: {count:,}")
    if summary.get("older_records"):
        lines.append(f"- older items no longer in the spec: {summary['older_records']:,}")
    if not result.skipped and not summary.get("older_records"):
        lines.append("- Nothing.")
    lines += ["", "## Watermark", ""]
    if kind == "google":
        lines += [
            "Every image was generated by a Google Gemini image model and carries Google's SynthID invisible",
            "watermark, which identifies it as AI-generated. Keep it that way: do not try to remove it.",
        ]
    elif kind == "gateway":
        lines += [
            "Google's Gemini image models add Google's SynthID invisible watermark to every image they make,",
            "which identifies it as AI-generated; the gateway these came through serves those models (runner",
            "cannot check the watermark itself). Keep it that way: do not try to remove it.",
        ]
    elif kind == "mock":
        lines.append("None: these are the mock's test patterns, not images of a Google model.")
    else:
        lines.append("Not known: where the images were made was not recorded.")
    if edit:
        lines += ["", "## Edit pairs", "", *_edit_roles(result.format, features)]
    lines += _chain(chosen)
    lines += ["", "## Fields", ""]
    lines += [f"- {code(f['name'])} ({_kind(f)}): {_meaning(f['name'], chosen, edit)}" for f in features]
    lines += ["", "## Loading", "", "```python", LOADING[result.format].format(dest=result.dest.as_posix()), "```"]
    lines += [
        "",
        "## Generator",
        "",
        f"Made with runner {__version__} (prompts in a YAML job spec, sent to an image",
        "generation gateway; one manifest line per image with its request, usage and cost).",
    ]
    if models:
        lines.append(f"Models: {', '.join(md(m) for m in models)}.")
    if result.warnings:
        lines += ["", "## Notes", ""] + [f"- {md(w)}" for w in result.warnings]
    return header + "\n".join(lines) + "\n"


def _labels(chosen: Selection) -> list[str]:
    """How many exported images carry each value of each label."""
    counts: dict[str, Counter[str]] = {}
    for rec in chosen.records:
        for name, value in (rec.get("vars") or {}).items():
            counts.setdefault(str(name), Counter())[str(value)] += 1
    if not counts:
        return []
    lines = [
        "",
        "## Labels",
        "",
        "Images per label value (the labels are the job's template variables and prompt-file columns):",
        "",
    ]
    for name in sorted(counts):
        values = counts[name]
        lines += [f"### {md(name)}", "", "| value | images |", "|---|---|"]
        lines += [f"| {md(v) or '(empty)'} | {n:,} |" for v, n in values.most_common(MAX_VALUES)]
        if len(values) > MAX_VALUES:
            lines.append(f"| ... {len(values) - MAX_VALUES:,} more values | |")
        lines.append("")
    return lines[:-1]


def _chain(chosen: Selection) -> list[str]:
    """An edit chain: which step edits which, with how many images each (from the records' inputs)."""
    step_of = {rec["item_id"]: rec.get("prompt_id", "") for rec in chosen.records}
    parent_step: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for rec in chosen.records:
        counts[str(rec.get("prompt_id", ""))] += 1
        for link in rec.get("inputs") or []:
            source = link.get("item_id")
            if isinstance(source, str):
                parent_step[str(rec.get("prompt_id", ""))] = step_of.get(source, "?")
    if not parent_step:
        return []
    lines = [
        "",
        "## Edit chain",
        "",
        "Some steps edit the images an earlier step of this job made (the source of such a row is another",
        "row's result: `source_item_id`, or `json.inputs[].item_id` in WebDataset), so a first image and its",
        "successive edits can be followed from row to row:",
        "",
        "| step (prompt_id) | edits the results of | images |",
        "|---|---|---|",
    ]
    lines += [
        f"| {md(step)} | {md(parent_step.get(step, '')) or '(first step)'} | {n:,} |" for step, n in counts.items()
    ]
    return lines


def _edit_roles(fmt: str, features: list[dict[str, Any]]) -> list[str]:
    if fmt == "imagefolder":
        return [
            "Each row is one edit: the **source** is `input_images` (the image(s) the model was given, before the",
            "edit; the first is the one to edit), the **instruction** is `prompt`, the **result** is `image`.",
        ]
    image = features[2]["name"] if len(features) > 2 else "png"
    inputs = [f["name"] for f in features if f["name"].startswith("input")]
    return [
        f"Each sample is one edit: the **source** is {', '.join(code(n) for n in inputs)} (the image(s) the model was",
        "given, before the edit; `input0` is the one to edit), the **instruction** is `json.prompt`, the",
        f"**result** is {code(image)}.",
    ]


def _meaning(name: str, chosen: Selection, edit: bool) -> str:
    """What a field holds, as Markdown."""
    if name in MEANINGS:
        plain, edited = MEANINGS[name]
        return edited if edit and edited else plain
    if name.startswith("input"):  # a WebDataset member: input0.png, input1.bin
        role, _, ext = name.partition(".")
        what = "source image" if edit else "reference image"
        raw = " (the original bytes: their type is in the JSON's inputs[].file_mime)" if ext == "bin" else ""
        return f"the {what} at position {role[5:]} of the request's images{raw}"
    if name.startswith("extra"):
        return "a further image of the same answer"
    if name == "bin":
        return "the generated image's original bytes (their type is in the JSON's image_file_mime)"
    if name in ("png", "jpg", "webp", "gif"):  # the image member
        return MEANINGS["image"][1 if edit else 0] or ""
    from .imagefolder import var_columns

    columns = {column: label for label, column in var_columns(chosen.var_names).items()}
    return f"a label: the value of the job's variable or prompt-file column {code(columns.get(name, name))}"


def _kind(feature: dict[str, Any]) -> str:
    if "dtype" in feature:
        return str(feature["dtype"])
    if "list" in feature:
        inner = feature["list"]
        return f"list of {inner if isinstance(inner, str) else 'struct'}"
    return "struct"
