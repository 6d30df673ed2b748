"""`runner export` as a library call: read an output dir (local or remote), choose where the dataset goes, write it, upload it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import OutputError, RunnerError, UsageError
from ..output import open_view
from ..output.bucket import upload_dir
from ..output.files import Jail, output_error
from .common import ExportResult, Filters
from .imagefolder import export_imagefolder
from .webdataset import DEFAULT_SHARD_SIZE, export_webdataset

FORMATS = ("imagefolder", "webdataset")


def export_dataset(
    out: str | Path,
    format: str = "imagefolder",
    *,
    to: str | Path | None = None,
    filters: Filters | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    all_records: bool = False,
) -> ExportResult:
    """Export the ok items of an output dir with a dataset card; `result.location` says where it went.

    The items are those the dir's spec asks for now (how many older records were left out is in the
    card and `result.older`); `all_records` exports every record's item. Without `to`: `imagefolder`
    goes into the output dir itself (its images are already there), `webdataset` into OUT/webdataset;
    for a remote output dir the files are written locally, then uploaded there. With `to`, into that
    local dir (images hardlinked, or copied). Nothing to export is a UsageError, with nothing written."""
    from ..report import read_scoped

    assert format in FORMATS, format
    sub = "" if format == "imagefolder" else "webdataset"
    with open_view(out) as view, tempfile.TemporaryDirectory(prefix="runner-export-") as tmp:
        manifests, summary = read_scoped(view, all_records)
        if to is not None:
            dest = Path(to)
        elif view.remote:
            dest = Path(tmp)  # written here, then uploaded into the remote output dir
        else:
            dest = Path(out) / sub if sub else Path(out)
            if sub and os.path.lexists(
                dest
            ):  # inside the output dir: a link planted there must not send shards elsewhere
                _real_folder(Path(out), sub)
        records = list(manifests.latest.values())
        try:
            if format == "imagefolder":
                # In the output dir itself the images are where they belong: nothing to place.
                in_place = (view.remote and to is None) or dest.resolve() == Path(out).resolve()
                result = export_imagefolder(
                    records, view.source, dest, filters=filters, summary=summary, copy_files=not in_place
                )
            else:
                result = export_webdataset(
                    records, view.source, dest, shard_size=shard_size, filters=filters, summary=summary
                )
        except OSError as e:
            raise _write_error(e, dest, to is not None) from None
        result.older = summary.get("older_records", 0)
        result.records_note = summary.get("records_note")
        result.location = str(dest)
        if view.remote and to is None:
            result.location = upload_dir(str(out), dest, sub)
    return result


def _write_error(e: OSError, dest: Path, given: bool) -> RunnerError:
    """An OSError while the export is written: `--to` naming a file (or a folder under one) is a
    usage error; anything else (a full disk, no permission) stops the export, saying so (exit 3)."""
    if given and e.errno in (errno.EEXIST, errno.ENOTDIR):
        return UsageError(f"--to {dest}: {e.filename or dest} is not a folder; name a folder (new or existing)")
    why = output_error(e, str(dest)).why
    name = getattr(e, "filename", None) or dest
    error = OutputError(f"cannot write the export to {dest}: {why} ({name}); the export stopped")
    error.errno, error.why = e.errno, why
    return error


def _real_folder(out: Path, name: str) -> None:
    jail = Jail(out)
    try:
        jail.dir_fd(name)
    except OSError as e:
        raise output_error(e, str(out)) from None
    finally:
        jail.close()
