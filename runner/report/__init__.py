"""After a run: the summary of an output dir (counts, failures, cost, quality) and its HTML gallery.

from runner.report import report
summary = report("out/demo", html="out/demo/gallery.html")   # what `runner report --json` prints
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..output import is_remote, open_view
from ..quality import DEFAULT_NEAR_THRESHOLD
from .summary import Summary


def report(
    out: str | Path,
    *,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    html: str | Path | None = None,
    images: bool = True,
) -> Summary:
    """Summarise an output dir (local or an fsspec URL) from its manifests, with the quality of its
    images; with `html`, also write the gallery there (`gallery`: its path and how many images).
    `images=False` skips the pass that reads every image (near duplicates, single-colour images):
    counts, byte duplicates and shapes come from the manifests alone.
    Raises UsageError for a dir that is not an output dir, a bad threshold, or --html on a remote dir."""
    from ..quality import analyze
    from .summary import read_manifests, summarize

    if html is not None and is_remote(out):
        raise UsageError("--html needs a local output dir: the gallery links to the image files")
    with open_view(out) as view:
        manifests = read_manifests(view)
        summary = summarize(manifests)
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
        shown = write_html(Path(html), Path(out), records, summary, title=title, quality=quality)
        summary["gallery"] = {"path": str(html), "images": shown}
    return summary
