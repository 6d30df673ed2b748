"""After a run: the summary of an output dir (counts, failures, cost, quality) and its HTML gallery.

from runner.report import report
summary = report("out/demo", html="out/demo/gallery.html")   # what `runner report --json` prints

Both report and export hold the items the output dir's spec asks for now (engine/current.py),
saying how many older records they leave out; `all_records=True` counts every record.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ..errors import OutputError, UsageError
from ..output import View, is_remote, open_view
from ..pricing import money
from ..quality import DEFAULT_NEAR_THRESHOLD
from .shapes import Summary
from .summary import Manifests


def read_scoped(view: View, all_records: bool = False) -> tuple[Manifests, Summary]:
    """The manifests and their summary, over the items of the dir's spec now (or every record, with
    `all_records` or when the spec cannot be read: `records_note` says why)."""
    from ..engine.current import ALL, current_items
    from .summary import read_manifests, require_manifest, summarize

    require_manifest(view)  # before the spec is expanded: a wrong dir is a usage error at once
    snapshot = view.snapshot()
    current = ALL if all_records else current_items(snapshot, lambda: view.scan(images=True))
    manifests = read_manifests(view, current.wants if current.ids is not None else None)
    summary = summarize(manifests)
    if current.ids is not None:
        summary["spec_items"] = len(current.ids)
        summary["older_records"] = len(manifests.older)
        summary["older_cost_usd"] = money(manifests.older_cost)
    elif current.note:
        summary["records_note"] = current.note
    sources = [x for x in snapshot.get("sources") or [] if isinstance(x, dict)]
    if not sources and summary["made_by_mock"]:  # written before runner recorded its sources
        sources = [{"base_url": "mock", "api_format": str(snapshot.get("api_format") or "nanobanana")}]
    summary["sources"] = [{k: str(v) for k, v in x.items() if k in ("base_url", "api_format")} for x in sources]
    return manifests, summary


def report(
    out: str | Path,
    *,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    html: str | Path | None = None,
    all_records: bool = False,
    images: bool = True,
) -> Summary:
    """Summarise an output dir (local or an fsspec URL) from its manifests, with the quality of its
    images; with `html`, also write the gallery there (`gallery`: its path and how many images).
    Only the items the dir's spec asks for now count, unless `all_records` (see read_scoped).
    `images=False` skips the pass that reads every image (near duplicates, single-colour images):
    counts, byte duplicates and shapes come from the manifests alone.
    Raises UsageError for a dir that is not an output dir, a bad threshold, or --html on a remote dir."""
    from ..quality import analyze

    if html is not None and is_remote(out):
        raise UsageError("--html needs a local output dir: the gallery links to the image files")
    with open_view(out) as view:
        manifests, summary = read_scoped(view, all_records)
        try:
            quality = analyze(
                manifests.latest.values(),
                view.source,
                near_threshold=near_threshold,
                cache_path=view.quality_cache() if images else None,
                images=images,
            )
        except ValueError as e:
            raise UsageError(f"--near-threshold: {e}") from None
    summary.update(quality)
    if html is not None:
        from .gallery import write_html

        title = summary.get("name") or Path(out).name
        records = list(manifests.latest.values())
        try:
            shown = write_html(Path(html), Path(out), records, summary, title=title, quality=quality)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise UsageError(f"--html {html}: {e.filename or html} is not a file in a folder") from None
            from ..output.files import output_error

            error = OutputError(f"cannot write the gallery to {html}: {output_error(e, str(html)).why}")
            error.errno = e.errno
            raise error from None
        summary["gallery"] = {"path": str(html), "images": shown}
    return summary
