"""The HTML gallery of a run: one offline page to judge up to 100,000 images, failures and references included."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from base64 import b64encode
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from itertools import chain
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, urlsplit

from ..engine.progress import plural
from ..output.files import atomic_file
from ..pricing import usd
from ..quality import Quality
from ..record import Record, safe_relpath, size_of
from .shapes import Summary

MAX_OPTIONS = 1000  # values a filter offers (the most frequent); the page says when there are more
FLAGS = ("duplicate", "near-duplicate", "wrong shape", "uniform")  # bits 1, 2, 4, 8 of an item's flags
_BUILTIN_KEYS = ("status", "error", "model", "aspect_ratio", "size", "flag", "dup", "near")
INPUT_SHAPE = "none (input's shape)"  # the aspect ratio filter's value for items that sent none

# Text from records is hostile: C0/C1 controls and lone surrogates become U+FFFD before anything is
# written (a lone surrogate cannot even be encoded). Bidi controls stay, and are isolated by the page.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean(value: Any) -> str:
    return _UNSAFE.sub("\ufffd", value if isinstance(value, str) else "" if value is None else str(value))


def _static(name: str) -> str:
    return files("runner.report").joinpath("static", name).read_text(encoding="utf-8")


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or line separators can break out."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _csp_hash(text: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


@cache
def _base_url(out_dir: Path, html_file: Path) -> str:
    """The output dir as a URL prefix relative to the HTML file (a file: URL across Windows drives)."""
    out_abs = os.path.abspath(out_dir)
    try:
        rel = os.path.relpath(out_abs, os.path.dirname(os.path.abspath(html_file)))
    except ValueError:
        return Path(out_abs).as_uri().rstrip("/") + "/"
    return quote(rel.replace(os.sep, "/")).rstrip("/") + "/"


def _inside(path: Any) -> TypeGuard[str]:
    """A path that stays inside the output dir (what record.py checks for image paths, for inputs too)."""
    return isinstance(path, str) and safe_relpath(path) and "\\" not in path and not _UNSAFE.search(path)


def _web_url(url: Any) -> str | None:
    """An http(s) URL with a host, else None: nothing else may reach an src or href."""
    if not isinstance(url, str) or _UNSAFE.search(url) or any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else None


class _Table:
    """Distinct texts, each cleaned and sent once; items refer to them by index."""

    def __init__(self, *preset: str) -> None:
        self.values: list[str] = list(preset)
        self.counts: list[int] = [0] * len(preset)
        self._by_clean: dict[str, int] = {v: i for i, v in enumerate(preset)}
        self._by_raw: dict[Any, int] = dict(self._by_clean)

    def add(self, raw: Any) -> int:
        if not isinstance(raw, str):  # a hand-edited line may hold a list where text belongs
            raw = json.dumps(raw) if isinstance(raw, (list, dict)) else str(raw)
        i = self._by_raw.get(raw)
        if i is None:  # cleaned once per distinct value; two raw values may clean to one text
            text = _clean(raw)
            i = self._by_clean.get(text)
            if i is None:
                i = self._by_clean[text] = len(self.values)
                self.values.append(text)
                self.counts.append(0)
            self._by_raw[raw] = i
        self.counts[i] += 1
        return i


class _Facet:
    """One filter: an option index per item (-1: the item has no value here)."""

    def __init__(self, key: str, label: str, *preset: str, by_count: bool = True) -> None:
        self.key, self.label, self.by_count = key, label, by_count
        self.table = _Table(*preset)
        self.v: list[int] = []

    def add(self, raw: Any, n: int) -> None:
        """Item n has value `raw` (None: no value)."""
        if len(self.v) < n:  # a variable first seen at item n, or missing from the items before
            self.v.extend([-1] * (n - len(self.v)))
        self.v.append(-1 if raw is None else self.table.add(raw))

    def data(self, n: int, hidden: bool = False) -> dict[str, Any]:
        self.v.extend([-1] * (n - len(self.v)))
        values, counts = self.table.values, self.table.counts
        order = list(range(len(values)))
        if self.by_count:
            order.sort(key=lambda i: (-counts[i], values[i]))
        return {"key": self.key, "label": self.label, "opts": values, "order": order[:MAX_OPTIONS],
                "counts": counts, "hidden": hidden, "v": self.v}  # fmt: skip


def _var_key(name: str) -> str:
    """The filter's key in the URL: the variable's name, unless a built-in filter has it."""
    return name if name not in _BUILTIN_KEYS and not name.startswith("var.") else "var." + name


def _refs(inputs: list[Any], base: str) -> tuple[list[tuple[str | None, str]], bool]:
    """A record's reference images as (src or None, label), and whether any src is a web URL."""
    refs: list[tuple[str | None, str]] = []
    web = False
    for inp in inputs:
        stored = inp.get("stored")
        if _inside(stored):
            src: str | None = base + quote(stored)
        else:
            src = _web_url(inp.get("url"))
            web = web or src is not None
        refs.append((src, _clean(inp.get("path") or inp.get("url") or stored or "?")))
    return refs, web


def _quality_index(quality: Quality | None) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """item_id -> its duplicate group, its near-duplicate group, its shape / uniform flag bits."""
    if quality is None:
        return {}, {}, {}
    dup = {iid: g for g, group in enumerate(quality["duplicates"]) for iid in group}
    near = {iid: g for g, group in enumerate(quality["near_duplicates"] or []) for iid in group}
    bits: dict[str, int] = {}
    for bit, flagged in ((4, quality["size_mismatches"]), (8, quality["uniform"])):
        for iid in flagged or []:
            bits[iid] = bits.get(iid, 0) | bit
    return dup, near, bits


def _items(records: Iterable[Record], quality: Quality | None, base: str) -> tuple[dict[str, Any], int, bool]:
    """The data island: one column per field, each repeated text sent once. Returns (data, ok items, web refs)."""
    in_dup, in_near, bits = _quality_index(quality)
    status, error = _Facet("status", "status", "ok", "failed", by_count=False), _Facet("error", "error")
    model, aspect, size = _Facet("model", "model"), _Facet("aspect_ratio", "aspect ratio"), _Facet("size", "size")
    dup = _Facet("dup", "duplicate group", by_count=False)
    near = _Facet("near", "near-duplicate group", by_count=False)
    var_facets: dict[str, _Facet] = {}
    step = _Facet("step", "step")  # an edit chain's steps (its prompts), shown when there is a chain
    chained = False
    prompts, prompt_ids, exts, messages, retried = _Table(), _Table(), _Table(), _Table(), _Table()
    input_sets: dict[Any, int] = {}
    inputs: list[list[tuple[str | None, str]]] = []
    ids: list[str] = []
    col: dict[str, list[Any]] = {
        k: [] for k in ("p", "pid", "img", "w", "h", "c", "a", "e", "in", "r", "fl", "rp", "sd")
    }
    p, pid, img, w, h, c, a, e, in_, r, fl, rp, sd = col.values()
    extra: dict[str, list[str]] = {}
    any_web = False
    for n, rec in enumerate(records):
        iid = rec["item_id"]
        ids.append(iid)
        config = rec.get("image_config") or {}
        model.add(rec["model"], n)
        # none sent: the model kept the input's shape
        aspect.add(config.get("aspect_ratio") if config.get("aspect_ratio", "") is not None else INPUT_SHAPE, n)
        size.add(size_of(rec), n)
        p.append(prompts.add(rec["prompt"]))
        pid.append(prompt_ids.add(rec["prompt_id"]))
        step.add(rec["prompt_id"], n)
        chained = chained or any("item_id" in x for x in rec.get("inputs") or [])
        c.append(round(rec.get("cost_usd") or 0, 6))
        rp.append(rec.get("repeat") if isinstance(rec.get("repeat"), int) else None)
        seed = (rec.get("params") or {}).get("seed")
        sd.append(seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
        a.append(rec.get("attempts", 1))
        tried = rec.get("retried")
        r.append(retried.add(", ".join(f"{k} ×{v}" for k, v in tried.items())) if tried else -1)
        for name, value in (rec.get("vars") or {}).items():
            facet = var_facets.get(name)
            if facet is None:
                facet = var_facets[name] = _Facet(_clean(_var_key(name)), _clean(name))
            facet.add(value, n)
        if rec["status"] == "ok":
            status.add("ok", n)
            error.add(None, n)
            path = rec["image_path"]
            stem = f"images/{iid[:2]}/{iid}."
            ext = path[len(stem) :]
            # the usual path goes as the index of its extension: 40 bytes an item fewer
            usual = path.startswith(stem) and ext.isascii() and ext.isalnum()
            img.append(exts.add(ext) if usual else base + quote(path))
            w.append(rec.get("width") or 0)
            h.append(rec.get("height") or 0)
            e.append(0)
            more = [base + quote(x["image_path"]) for x in rec.get("extra_images") or []]
            if more:
                extra[str(n)] = more
        else:
            status.add("failed", n)
            err = rec["error"]
            error.add(err["kind"], n)
            img.append(None)
            w.append(0)
            h.append(0)
            e.append([err.get("status"), messages.add(err.get("message")), int(bool(rec.get("interrupted")))])
        refs = rec.get("inputs")
        if refs:
            key = tuple((x.get("stored"), x.get("url"), x.get("path")) for x in refs)
            k = input_sets.get(key)
            if k is None:
                shown, web = _refs(refs, base)
                any_web = any_web or web
                k = input_sets[key] = len(inputs)
                inputs.append(shown)
            in_.append(k)
        else:
            in_.append(-1)
        g, m = in_dup.get(iid), in_near.get(iid)
        dup.add(None if g is None else str(g + 1), n)
        near.add(None if m is None else str(m + 1), n)
        fl.append((0 if g is None else 1) | (0 if m is None else 2) | bits.get(iid, 0))

    count = len(ids)
    facets = [status.data(count), error.data(count), model.data(count), aspect.data(count), size.data(count)]
    if chained:  # source -> edits: filter by step; each edit's card shows its source beside it
        facets.append(step.data(count))
    facets += [var_facets[k].data(count) for k in sorted(var_facets)]
    if quality is not None:
        found = (quality["duplicates"], quality["near_duplicates"], quality["size_mismatches"], quality["uniform"])
        given = [(name, bit) for name, bit, ids in zip(FLAGS, (1, 2, 4, 8), found, strict=True) if ids is not None]
        opts = [name for name, _ in given] + ["none of these"]
        facets.append({"key": "flag", "label": "flags", "opts": opts, "bits": [bit for _, bit in given] + [0],
                       "order": list(range(len(opts))), "v": fl})  # fmt: skip
        facets += [dup.data(count, hidden=True), near.data(count, hidden=True)]
    data = {
        "base": base,
        "id": ids,
        **col,
        "facets": facets,
        "prompts": prompts.values,
        "pids": prompt_ids.values,
        "exts": exts.values,
        "msgs": messages.values,
        "retried": retried.values,
        "inputs": inputs,
        "extra": extra,
    }
    return data, status.table.counts[0], any_web


def _money(value: float) -> str:
    return usd(value)  # the rule `runner report` uses


def _kinds(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return ""
    return " (" + ", ".join(f"<bdi>{html.escape(_clean(k))}</bdi> {int(n)}" for k, n in counts.items()) + ")"


def _header(title: str, out_dir: Path, summary: Summary, quality: Quality | None) -> str:
    esc = html.escape
    lat = summary.get("latency_s") or {}
    p50, p95 = (("-" if lat.get(k) is None else f"{lat[k]:.1f}s") for k in ("p50", "p95"))
    stats = (
        f"<strong>{int(summary.get('ok', 0)):,}</strong> ok · <strong>{int(summary.get('failed', 0)):,}</strong> failed"
        f"{_kinds(summary.get('failures_by_kind'))} · {int(summary.get('retries', 0)):,} retries"
        f"{_kinds(summary.get('retries_by_kind'))} · {int(summary.get('requests', 0)):,} requests"
        f" · cost <strong>{_money(float(summary.get('cost_usd', 0.0)))}</strong> · latency p50 {p50}, p95 {p95}"
    )
    older = int(summary.get("older_records") or 0)
    if older:  # the gallery shows what the spec asks for now, like the report
        stats += f" · {plural(older, 'older item')} no longer in the spec left out (--all-records)"
    lines = [
        f'<h1 dir="auto">{esc(_clean(title))}</h1>',
        f'<p class="outdir"><bdi>{esc(_clean(str(out_dir)))}</bdi></p>',
        f'<p class="stats">{stats}</p>',
    ]
    if quality is not None:
        dups = quality.get("duplicates") or []
        parts = [f"duplicates: {_groups(dups)}"]
        near = quality.get("near_duplicates")
        parts.append("near-duplicates: " + ("not computed (needs the images extra)" if near is None else _groups(near)))
        parts.append(f"wrong shape: {len(quality.get('size_mismatches') or []):,}")
        uniform = quality.get("uniform")
        parts.append("uniform: not checked" if uniform is None else f"uniform: {len(uniform):,}")
        lines.append(f'<p class="quality">{" · ".join(parts)}</p>')
    return "\n".join(lines)


def _groups(groups: list[list[str]]) -> str:
    n = len(groups)
    return f"{plural(n, 'group')} ({sum(len(g) for g in groups):,} items)"


def write_html(
    html_file: Path,
    out_dir: Path,
    records: Iterable[Record],
    summary: Summary,
    *,
    title: str,
    quality: Quality | None = None,
) -> int:
    """Write the gallery of `out_dir` to `html_file` (atomically); returns the number of output images shown.

    `records` is the latest record of each item (ok and failed), `summary` what `runner report`
    sums up, `quality` its duplicate / shape / uniform findings (None: no flags). Images are not
    embedded: cards point at the files, relative to the HTML file, and the page renders them
    from a compact JSON island in pages as you scroll.
    """
    data, shown, any_url = _items(records, quality, _base_url(out_dir, html_file))
    css, js = _static("gallery.css"), _static("gallery.js")
    # Only this page's own script and style run: even text that escaped escaping could not execute.
    csp = (
        f"default-src 'none'; img-src 'self' file: data: blob:{' http: https:' if any_url else ''}; "
        f"style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; base-uri 'none'; form-action 'none'"
    )
    clean_title = _clean(title)
    head = (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>\u2068{html.escape(clean_title)}\u2069 · gallery</title>\n"
        f"<style>{css}</style></head>\n<body>\n<header>\n{_header(clean_title, out_dir, summary, quality)}\n</header>\n"
        '<nav id="filters" class="filters" aria-label="filters"><span id="count"></span></nav>\n'
        "<noscript><p>The gallery needs JavaScript; <code>runner report</code> prints the same figures.</p></noscript>\n"
        '<main id="grid"></main>\n'
        '<button id="more" type="button" hidden>show more</button>\n'
        '<script type="application/json" id="gallery-data">{'
    )
    # the island goes out a column at a time: a 100,000-item page is never held as one string
    columns = (("," if i else "") + json.dumps(k) + ":" + _json_for_script(v) for i, (k, v) in enumerate(data.items()))
    tail = f"}}</script>\n<script>{js}</script>\n</body></html>\n"
    _write_atomic(html_file, chain([head], columns, [tail]))
    return shown


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write the page whole or not at all, never through a symlink (output.files.atomic_file)."""
    with atomic_file(path) as f:
        for chunk in chunks:
            f.write(chunk.encode("utf-8", "replace"))  # "replace": the page is written whatever the text
