"""A single self-contained HTML gallery of an output dir: thumbnails, filters, and the failures."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .record import Record
from .report import size_of

MAX_FAILED_ROWS = 2000  # the failures table lists this many; `runner report` has the counts of all
MAX_OPTIONS = 500  # values offered per filter (the most frequent ones)

# Images are not embedded: each card points at its file, relative to the HTML file, and the page
# renders cards from a compact JSON list in batches as you scroll, so 100k items stay usable.
_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;padding:16px 20px;color:#1d1d1f;background:#f6f6f7}
h1{font-size:20px;margin:0 0 6px}h2{font-size:16px;margin:28px 0 8px}
.stats{color:#555;margin:0 0 12px}.stats strong{color:#1d1d1f}
.filters{display:flex;flex-wrap:wrap;gap:10px 16px;align-items:center;margin:10px 0 14px}
.filters label{display:flex;gap:6px;align-items:center;font-weight:600}
.filters select{max-width:260px;font:inherit;padding:2px 4px}
#count{color:#555}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:8px;overflow:hidden;display:flex;flex-direction:column}
.card a{display:block;background:#e9e9ec}
.card img{display:block;width:100%;height:200px;object-fit:contain}
.card.broken img{height:60px}
.card.broken a::after{content:"image missing";display:block;padding:4px 8px;color:#b00020;font-size:12px}
.card figcaption{padding:8px 10px;display:flex;flex-direction:column;gap:4px}
.prompt{margin:0;max-height:7.2em;overflow:auto;white-space:pre-wrap;word-break:break-word}
.meta{color:#555;font-size:12px}
.vars{display:flex;flex-wrap:wrap;gap:4px}
.vars span{background:#eef1f8;border-radius:4px;padding:0 5px;font-size:12px}
#more{margin:16px auto;display:block;font:inherit;padding:6px 14px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;font-size:13px}
td.msg,td.prompt-cell{max-width:480px;word-break:break-word}
code{font-size:12px}
"""

_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("gallery-data").textContent);
  var items = data.items; // [src, prompt, prompt_id, model, aspect_ratio, image_size, cost_usd, vars|null, item_id]
  var grid = document.getElementById("grid");
  var more = document.getElementById("more");
  var count = document.getElementById("count");
  var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-filter]"));
  var BATCH = 240, matched = items, shown = 0;

  function onLoad() { this.setAttribute("data-loaded", "1"); }
  function onError() { this.setAttribute("data-loaded", "0"); this.closest(".card").classList.add("broken"); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function card(it) {
    var fig = el("figure", "card");
    fig.title = it[8];
    var link = el("a");
    link.href = it[0];
    link.target = "_blank";
    link.rel = "noopener";
    var img = document.createElement("img");
    img.onload = onLoad;
    img.onerror = onError;
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = it[1];
    img.src = it[0];
    link.appendChild(img);
    fig.appendChild(link);
    var cap = el("figcaption");
    cap.appendChild(el("p", "prompt", it[1]));
    var size = it[4] + (it[5] ? " \\u00b7 " + it[5] : "");
    cap.appendChild(el("div", "meta", it[2] + " \\u00b7 " + it[3] + " \\u00b7 " + size + " \\u00b7 $" + Number(it[6]).toFixed(3)));
    if (it[7]) {
      var vars = el("div", "vars");
      Object.keys(it[7]).forEach(function (k) { vars.appendChild(el("span", null, k + ": " + it[7][k])); });
      cap.appendChild(vars);
    }
    fig.appendChild(cap);
    return fig;
  }
  function renderMore() {
    var frag = document.createDocumentFragment();
    var end = Math.min(matched.length, shown + BATCH);
    for (; shown < end; shown++) frag.appendChild(card(matched[shown]));
    grid.appendChild(frag);
    more.hidden = shown >= matched.length;
    count.textContent = "showing " + shown + " of " + matched.length +
      (matched.length === items.length ? "" : " matching (" + items.length + " in all)");
  }
  function apply() {
    var want = selects.filter(function (s) { return s.value !== ""; }).map(function (s) {
      return [s.getAttribute("data-filter"), s.getAttribute("data-var"), s.value];
    });
    matched = want.length === 0 ? items : items.filter(function (it) {
      return want.every(function (w) {
        if (w[0] === "model") return it[3] === w[2];
        return !!it[7] && Object.prototype.hasOwnProperty.call(it[7], w[1]) && it[7][w[1]] === w[2];
      });
    });
    grid.textContent = "";
    shown = 0;
    renderMore();
  }
  function key(s) { return s.getAttribute("data-filter") === "model" ? "model" : s.getAttribute("data-var"); }
  function remember() { // the filters live in the URL's #fragment, so a filtered view can be bookmarked
    var q = new URLSearchParams();
    selects.forEach(function (s) { if (s.value !== "") q.set(key(s), s.value); });
    try { history.replaceState(null, "", "#" + q.toString()); } catch (e) { /* some file: URLs refuse */ }
  }
  var initial = new URLSearchParams(location.hash.slice(1));
  selects.forEach(function (s) {
    var v = initial.get(key(s));
    if (v !== null && Array.prototype.some.call(s.options, function (o) { return o.value === v; })) s.value = v;
    s.addEventListener("change", function () { remember(); apply(); });
  });
  more.addEventListener("click", renderMore);
  if ("IntersectionObserver" in window) {
    new IntersectionObserver(function (entries) {
      if (entries.some(function (e) { return e.isIntersecting; }) && !more.hidden) renderMore();
    }, { rootMargin: "800px" }).observe(more);
  }
  apply();
})();
"""


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or line separators can break out."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _src(out_abs: str, image_path: str, base: str) -> str:
    """The image's URL relative to the HTML file's folder (a file: URL across Windows drives)."""
    target = os.path.join(out_abs, image_path)
    try:
        rel = os.path.relpath(target, base)
    except ValueError:
        return Path(target).as_uri()
    return quote(rel.replace(os.sep, "/"))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _select(label: str, attrs: str, counts: dict[str, int]) -> str:
    shown = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_OPTIONS]
    options = [f'<option value="">all ({sum(counts.values())})</option>']
    options += [f'<option value="{html.escape(v)}">{html.escape(v)} ({n})</option>' for v, n in shown]
    return f"<label>{html.escape(label)} <select {attrs}>{''.join(options)}</select></label>"


def write_html(
    html_file: Path, out: Path, records: list[Record], summary: dict[str, Any], *, title: str, quality: Any = None
) -> int:
    """Write the gallery of `out` to `html_file` (atomically); returns the number of images shown."""
    last = {r["item_id"]: r for r in records}
    out_abs = os.path.abspath(out)
    base = os.path.dirname(os.path.abspath(html_file))
    items: list[list[Any]] = []
    models: dict[str, int] = {}
    var_values: dict[str, dict[str, int]] = {}
    failed: list[dict[str, Any]] = []
    for rec in last.values():
        if rec.get("status") != "ok":
            failed.append(rec)
            continue
        if not isinstance(rec.get("image_path"), str):
            continue
        config = rec.get("image_config") if isinstance(rec.get("image_config"), dict) else {}
        model = _text(rec.get("model"))
        models[model] = models.get(model, 0) + 1
        vars_ = None
        if isinstance(rec.get("vars"), dict) and rec["vars"]:
            vars_ = {str(k): _text(v) for k, v in rec["vars"].items()}
            for k, v in vars_.items():
                counts = var_values.setdefault(k, {})
                counts[v] = counts.get(v, 0) + 1
        cost = rec.get("cost_usd")
        items.append(
            [
                _src(out_abs, rec["image_path"], base),
                _text(rec.get("prompt")),
                _text(rec.get("prompt_id")),
                model,
                _text(config.get("aspect_ratio")),
                size_of(rec),
                cost if isinstance(cost, (int, float)) else 0,
                vars_,
                _text(rec.get("item_id")),
            ]
        )

    filters = [_select("model", 'data-filter="model"', models)]
    filters += [
        _select(name, f'data-filter="var" data-var="{html.escape(name)}"', var_values[name])
        for name in sorted(var_values)
    ]
    page = _page(out, summary, items, filters, failed)
    html_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_file.with_name(f".{html_file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(page.encode("utf-8", "replace"))  # "replace": a lone surrogate must not stop it
        os.replace(tmp, html_file)
    finally:
        tmp.unlink(missing_ok=True)
    return len(items)


def _page(
    out: Path, summary: dict[str, Any], items: list[list[Any]], filters: list[str], failed: list[dict[str, Any]]
) -> str:
    esc = html.escape
    lat = summary["latency_s"]
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.1f}s"
    p95 = "-" if lat["p95"] is None else f"{lat['p95']:.1f}s"
    kinds = ", ".join(f"{esc(k)} {n}" for k, n in summary["failures_by_kind"].items())
    stats = (
        f"<strong>{summary['ok']}</strong> ok · <strong>{summary['failed']}</strong> failed{f' ({kinds})' if kinds else ''}"
        f" · cost <strong>${summary['cost_usd']:.2f}</strong> · latency p50 {p50}, p95 {p95}"
        f" · {summary['requests']} requests ({summary['retries']} retries)"
    )
    rows = []
    for rec in failed[:MAX_FAILED_ROWS]:
        error = rec.get("error") if isinstance(rec.get("error"), dict) else {}
        rows.append(
            "<tr>"
            f"<td><code>{esc(_text(rec.get('item_id')))}</code></td>"
            f"<td>{esc(_text(rec.get('prompt_id')))}</td>"
            f"<td>{esc(_text(rec.get('model')))}</td>"
            f"<td>{esc(_text(error.get('kind')))}</td>"
            f"<td>{esc(_text(error.get('status')))}</td>"
            f'<td class="msg">{esc(_text(error.get("message")))}</td>'
            f"<td>{esc(_text(rec.get('attempts')))}</td>"
            f'<td class="prompt-cell">{esc(_text(rec.get("prompt")))}</td>'
            "</tr>"
        )
    if len(failed) > MAX_FAILED_ROWS:
        rows.append(f'<tr><td colspan="8">… and {len(failed) - MAX_FAILED_ROWS} more (runner report)</td></tr>')
    failures = (
        "<table><thead><tr><th>item_id</th><th>prompt_id</th><th>model</th><th>kind</th><th>status</th>"
        f"<th>message</th><th>attempts</th><th>prompt</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>none</p>"
    )
    csp = (
        "default-src 'none'; img-src 'self' file: data: blob:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>runner gallery: {esc(out.name or str(out))}</title>\n"
        f"<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{esc(str(out))}</h1>\n"
        f'<p class="stats">{stats}</p>\n'
        f'<div class="filters">{"".join(filters)}<span id="count">{len(items)} images</span></div>\n'
        "<noscript><p>The thumbnails need JavaScript; the failures below do not.</p></noscript>\n"
        '<div id="grid"></div>\n'
        '<button id="more" type="button" hidden>show more</button>\n'
        f'<h2 id="failed">Failed items ({len(failed)})</h2>\n{failures}\n'
        f'<script type="application/json" id="gallery-data">{_json_for_script({"items": items})}</script>\n'
        f"<script>{_JS}</script>\n"
        "</body></html>\n"
    )
