"""Issue 22: a dataset you can publish as it comes out. The README's edit dataset, run and loaded as
written; what the spec asks for now; loaders that never choke; a card that tells the truth; edits at
the input's shape; paths relative to the prompt file; the smaller things a user hit."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import shutil
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from runner.engine.current import spec_item_ids
from runner.errors import UsageError
from runner.export import Filters, export_imagefolder, export_webdataset
from runner.export import webdataset as wds_export
from runner.gateway.formats import request_body
from runner.gateway.gemini import GeminiFormat
from runner.mock.images import scaled_size
from runner.models import nearest_ratio
from runner.pricing import usd
from runner.quality import LocalSource
from runner.report.text import format_quality
from runner.spec import ImageConfig, load_spec
from runner.spec.items import item_id, iter_items

from .conftest import ROOT, StartGateway, read_manifest, run_cli, write_spec
from .test_quality import OutDir, picture
from .test_quality import item_id as iid

README = ROOT / "README.md"


def readme_block(name: str) -> str:
    """The fenced code block after `<!-- test: NAME -->` in the README, as written."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- test: {re.escape(name)} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"README has no block marked {name}"
    return found.group(1)


def run_commands(block: str) -> list[Any]:
    """Each `runner ...` line of a README block, as a user would type it (comments are the shell's)."""
    done = []
    for raw in block.splitlines():
        args = shlex.split(raw, comments=True)
        if not args:
            continue
        assert args[0] == "runner", raw
        proc = run_cli(*args[1:])
        assert proc.returncode == 0, (raw, proc.stderr)
        done.append(proc)
    return done


def run_python(block: str) -> dict[str, Any]:
    """A README Python block, as written, in a fresh namespace; its variables are returned."""
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what a user sees as warnings is not a failure of the example
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the repo's jobs/ and sample_prompts/, as the current directory; `datasets` caches in it."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    for folder in ("jobs", "sample_prompts"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    yield tmp_path


def current_ids(job: Path) -> set[str]:
    return {f"{key:020x}" for key in spec_item_ids(load_spec(job))}


def test_the_readme_edit_dataset_from_run_to_loaders(workdir: Path) -> None:
    """The issue's finish line: the README's edit dataset (JPEG, PNG and WebP photos, a CSV with
    categories, two seeds each) runs on the mock with no aspect ratio and keeps each photo's shape;
    both exports load, as the README writes it, in `datasets` (imagefolder and webdataset) and
    `webdataset`; a mistyped --where is exit 2 and leaves nothing; the card says mock; then a changed
    photo and a removed row: the run says so, and every export and loader holds exactly what the
    spec asks for now."""
    job = workdir / "jobs" / "photo-edits.yaml"
    commands, loading = readme_block("edit-commands"), readme_block("edit-loading")

    (run, *_) = run_commands(commands)
    ids = current_ids(job)
    assert len(ids) == 16
    records = {r["item_id"]: r for r in read_manifest(workdir / "out" / "photo-edits")}
    assert set(records) == ids
    products = workdir / "sample_prompts" / "edits" / "products"
    for rec in records.values():  # no aspect ratio sent: each edit has its photo's shape (on the mock too)
        assert rec["image_config"] == {"aspect_ratio": None, "image_size": "1K"}
        with Image.open(products / Path(rec["inputs"][0]["path"]).name) as photo:
            expected = nearest_ratio("nanobanana_pro", *photo.size)
        w, h = (int(x) for x in expected.split(":"))
        assert abs(rec["width"] / rec["height"] / (w / h) - 1) < 0.02, (rec["inputs"][0]["path"], expected)
    assert {r["inputs"][0]["mime"] for r in records.values()} == {"image/jpeg", "image/png", "image/webp"}
    report = json.loads(run_cli("report", "out/photo-edits", "--json").stdout)
    assert report["size_mismatches"] == [] and report["older_records"] == 0 and report["spec_items"] == 16

    # a mistyped filter: exit 2, the values that exist, nothing written (the README shows it)
    shown = re.search(r"\$ (runner export out/photo-edits --where category=scnee [^\n]*)\n(runner: error: [^\n]*)",
                      README.read_text())  # fmt: skip
    assert shown
    refused = run_cli(*shlex.split(shown.group(1))[1:])
    assert refused.returncode == 2 and refused.stderr.strip() == shown.group(2)
    assert not (workdir / "dist" / "scenes").exists()

    card = (workdir / "dist" / "photo-edits" / "README.md").read_text()
    assert "made by runner's built-in mock gateway" in card and "SynthID" not in card
    assert "the **source** is `input_images`" in card and "### category" in card and "| scene | 8 |" in card
    header = yaml.safe_load(card.split("---\n")[1])
    assert "runner-mock" in header["tags"]

    namespace = run_python(loading)
    check_loaded(namespace, ids)

    # a changed photo and a removed row: the run that sees it says so
    with Image.open(products / "mug.jpg") as mug:
        mug.rotate(180).save(products / "mug.jpg", "JPEG", quality=80)
    csv = workdir / "sample_prompts" / "edits" / "instructions.csv"
    csv.write_text("".join(line for line in csv.read_text().splitlines(True) if not line.startswith("lamp-brass,")))
    (run, *_) = run_commands(commands)
    assert (
        "the spec changed since the last run in out/photo-edits: 4 new items, 6 recorded items are no longer "
        "in the spec" in run.stderr
    )
    ids = current_ids(job)
    assert len(ids) == 14 and len({r["item_id"] for r in read_manifest(workdir / "out" / "photo-edits")}) == 20
    report = json.loads(run_cli("report", "out/photo-edits", "--json").stdout)
    assert (report["items"], report["spec_items"], report["older_records"]) == (14, 14, 6)
    assert json.loads(run_cli("report", "out/photo-edits", "--json", "--all-records").stdout)["items"] == 20
    card = (workdir / "dist" / "photo-edits" / "README.md").read_text()
    assert "6 older items whose records the spec no longer asks for" in card
    check_loaded(run_python(loading), ids)


def check_loaded(namespace: dict[str, Any], ids: set[str]) -> None:
    """What the README's loading code made: exactly the spec's items, as (source, instruction, result)."""
    ds, shards, pairs = namespace["ds"], namespace["shards"], namespace["pairs"]
    assert set(ds["item_id"]) == ids and len(ds) == len(ids)
    assert {row["__key__"] for row in shards} == ids and len(shards) == len(ids)
    assert len(pairs) == len(ids)
    source, instruction, result = namespace["source"], namespace["instruction"], namespace["result"]
    assert isinstance(instruction, str) and source.size[0] > 0 and result.size[0] > 0
    assert set(namespace["categories"]) <= {"scene", "recolor", "material"}
    for photo, text, edited, category in pairs:
        assert photo.size in {(480, 360), (360, 480), (400, 400), (360, 640)} and text and edited.size[0] > 0
        assert category in {"scene", "recolor", "material"}
    row = ds[0]
    assert row["image"].size == (row["width"], row["height"]) and row["input_images"][0].size[0] > 0


def test_the_readme_export_section_runs_as_written(workdir: Path) -> None:
    run_commands(readme_block("export-commands"))
    namespace = run_python(readme_block("export-loading"))
    ds = namespace["ds"]
    assert len(ds) == 12 and set(ds[0]["json"]["vars"]) == {"subject", "style", "lighting"}


# --- item 1: one member name per role --------------------------------------------------------------


def mixed_edit_dir(root: Path) -> OutDir:
    """Edits whose source photos are a JPEG, a PNG and a WebP; one item has no source, one has two."""
    out = OutDir(root)
    sources = []
    for n, fmt in enumerate(("JPEG", "PNG", "WEBP")):
        data = picture(48, 32, seed=100 + n, fmt=fmt)
        entry = out.stored_input(data, f"products/p{n}.{fmt.lower()}")
        mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[fmt]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        moved = entry["stored"].rsplit(".", 1)[0] + "." + ext
        (root / entry["stored"]).rename(root / moved)
        sources.append({**entry, "mime": mime, "stored": moved})
    for n in range(1, 8):
        inputs = [sources[n % 3]] if n < 6 else ([] if n == 6 else [sources[0], sources[1]])
        out.add(n, picture(64, 64, seed=n), inputs=inputs, vars_={"category": ["scene", "recolor"][n % 2]})
    out.write()
    return out


def test_webdataset_with_mixed_source_formats_loads_in_datasets_and_webdataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    wds = pytest.importorskip("webdataset")
    out = mixed_edit_dir(tmp_path / "out")
    dest = tmp_path / "wds"
    result = export_webdataset(out.records, LocalSource(out.root), dest, shard_size=3)  # type: ignore[arg-type]
    assert result.written == 7
    signatures = []
    for shard in sorted(dest.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        members = {tuple(sorted(n.split(".", 1)[1] for n in names if n.startswith(key)))
                   for key in {n.split(".")[0] for n in names}}  # fmt: skip
        assert len(members) == 1, (shard.name, members)  # every sample of a shard: the same members
        signatures.append(members.pop())
    assert signatures[0] == ("input0.png", "input1.png", "json", "png")  # the most members first
    assert ("input0.png", "json", "png") in signatures and ("json", "png") in signatures
    ds = datasets.load_dataset("webdataset", data_files=str(dest / "shard-*.tar"), split="train",
                               cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert len(ds) == 7 and isinstance(ds.features["input0.png"], datasets.Image)
    by_key = {row["__key__"]: row for row in ds}
    assert by_key[iid(6)]["input0.png"] is None and by_key[iid(7)]["input1.png"].size == (48, 32)
    jpeg = (out.root / out.records[2]["inputs"][0]["stored"]).read_bytes()  # item 3: the JPEG source
    with Image.open(io.BytesIO(jpeg)) as original:
        assert by_key[iid(3)]["input0.png"].convert("RGB").tobytes() == original.convert("RGB").tobytes()
    assert by_key[iid(3)]["json"]["inputs"][0]["mime"] == "image/jpeg"
    assert by_key[iid(3)]["json"]["inputs"][0]["file_mime"] == "image/png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(
            wds.WebDataset(sorted(str(p) for p in dest.glob("shard-*.tar")), shardshuffle=False).decode("pil")
        )
    assert len(samples) == 7 and all(s["png"].size == (64, 64) for s in samples)


def test_without_pillow_mixed_sources_keep_their_bytes_under_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(wds_export, "_pillow", lambda: False)
    out = mixed_edit_dir(tmp_path / "out")
    dest = tmp_path / "wds"
    result = export_webdataset(out.records, LocalSource(out.root), dest)  # type: ignore[arg-type]
    assert any(".bin" in w and "install Pillow" in w for w in result.warnings)
    with tarfile.open(dest / "shard-000000.tar") as tar:
        names = tar.getnames()
        raw = {n: tar.extractfile(n).read() for n in names if n.endswith(".bin")}  # type: ignore[union-attr]
    assert names[:4] == [names[0].split(".")[0] + x for x in (".png", ".json", ".input0.bin", ".input1.png")]
    assert all(data[:4] in (b"\xff\xd8\xff\xe0", b"\x89PNG", b"RIFF") for data in raw.values())  # as they were
    ds = datasets.load_dataset("webdataset", data_files=str(dest / "shard-*.tar"), split="train",
                               cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert len(ds) == 7 and ds.features["input0.bin"].dtype == "binary"
    row = next(r for r in ds if r["input0.bin"] is not None)
    kind = row["json"]["inputs"][0]["file_mime"]
    assert kind == row["json"]["inputs"][0]["mime"] and Image.open(io.BytesIO(row["input0.bin"])).size == (48, 32)
    card = (dest / "README.md").read_text()
    assert "- `input0.bin` (binary): the source image at position 0" in card and "file\\_mime" not in card


# --- item 3: nothing exported is an error, and leaves nothing --------------------------------------


def test_an_export_that_would_hold_nothing_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    out = mixed_edit_dir(tmp_path / "out")
    source = LocalSource(out.root)
    for export_to in (export_imagefolder, export_webdataset):
        dest = tmp_path / "new" / export_to.__name__
        with pytest.raises(UsageError, match=r"--where category=scnee: no ok item has that value \(category has "
                           r"'recolor' \(4\), 'scene' \(3\)\)"):  # fmt: skip
            export_to(out.records, source, dest, filters=Filters(where=(("category", "scnee"),)))  # type: ignore[operator]
        with pytest.raises(UsageError, match="no item has a label named colour"):
            export_to(out.records, source, dest, filters=Filters(where=(("colour", "red"),)))  # type: ignore[operator]
        assert not (tmp_path / "new").exists()
    # every selected file gone: refused after the fact, an earlier export left as it was
    dest = tmp_path / "dist"
    export_imagefolder(out.records, source, dest)  # type: ignore[arg-type]
    before = (dest / "metadata.jsonl").read_bytes()
    for rec in out.records:
        (out.root / rec["image_path"]).unlink()
    gone = OutDir(out.root)
    gone.records = out.records
    with pytest.raises(UsageError, match="nothing to export"):
        export_imagefolder(gone.records, LocalSource(out.root), dest)  # type: ignore[arg-type]
    assert (dest / "metadata.jsonl").read_bytes() == before
    proc = run_cli("export", str(out.root), "--to", str(tmp_path / "cli"))  # no spec: every record; none ok on disk
    assert proc.returncode == 2 and not (tmp_path / "cli").exists()


# --- item 4: the card -------------------------------------------------------------------------------


def test_the_card_escapes_names_and_labels_and_tells_the_filter(tmp_path: Path) -> None:
    out = OutDir(tmp_path / "out")
    evil = "a\n---\n# <b>x</b> | `y`"
    out.add(1, picture(32, 32, seed=1), vars_={"cat\negory": evil, "style": "ink"})
    out.add(2, picture(32, 32, seed=2), vars_={"cat\negory": "plain", "style": "ink"})
    out.write()
    summary = {"name": "my\n---\ndataset <script>", "ok": 2, "failed": 0, "made_by_mock": False,
               "sources": [{"base_url": "https://generativelanguage.googleapis.com/v1beta", "api_format": "gemini"}]}  # fmt: skip
    filters = Filters(where=(("style", "ink"),), exclude_duplicates=True)
    export_imagefolder(out.records, LocalSource(out.root), out.root, filters=filters, summary=summary)  # type: ignore[arg-type]
    text = (out.root / "README.md").read_text()
    front, body = text.split("\n---\n", 1)  # the YAML header ends once, where it should
    header = yaml.safe_load(front.removeprefix("---\n"))
    assert header["pretty_name"] == "my --- dataset <script>"
    names = [f["name"] for f in header["dataset_info"]["features"]]
    assert "cat\negory" in names  # the column as the loader names it, exactly
    assert "\n---\n" not in body and "<script>" not in body and "<b>" not in body
    assert "# my --- dataset &lt;script&gt;" not in body and "# my --- dataset \\<script\\>" in body
    assert "Filter: `--where style=ink --exclude-duplicates`." in text
    assert "Google's Gemini API directly" in text and "carries Google's SynthID" in text  # from Google: SynthID
    assert "### cat egory" in text and "| a --- \\# \\<b\\>x\\</b\\> \\| \\`y\\` | 1 |" in text  # one line, inert


# --- item 5: no aspect ratio -------------------------------------------------------------------------


def test_a_config_without_aspect_ratio_sends_none_and_keeps_the_ids_of_those_with_one(tmp_path: Path) -> None:
    # the documented id of a config with a ratio, computed here the way the README says
    documented = hashlib.sha256(json.dumps(["nanobanana_pro", "a cat", "1:1", "2K", 0]).encode()).hexdigest()[:20]
    assert item_id("nanobanana_pro", "a cat", ImageConfig("1:1", "2K"), 0) == documented
    assert item_id("nanobanana_pro", "a cat", ImageConfig(None, "2K"), 0) != documented
    photo = tmp_path / "p.png"
    photo.write_bytes(picture(90, 160, seed=1))
    path = write_spec(
        tmp_path, image_configs=[{"image_size": "2K"}, {}], prompts=[{"prompt": "edit", "images": ["p.png"]}]
    )
    items = list(iter_items(load_spec(path)))
    assert [i.config for i in items] == [ImageConfig(None, "2K"), ImageConfig(None, None)]
    chat = request_body(items[0], "nanobanana", ["data:image/png;base64,AAAA"])
    assert chat["extra_body"] == {"google": {"image_config": {"image_size": "2K"}}}
    assert "extra_body" not in request_body(items[1], "nanobanana", ["data:image/png;base64,AAAA"])
    compatible = request_body(items[1], "openai-compatible", ["data:image/png;base64,AAAA"])
    assert "image_config" not in compatible and compatible["modalities"] == ["image", "text"]
    gemini = GeminiFormat().request(items[0], load_spec(path).inputs)
    assert gemini["generationConfig"]["imageConfig"] == {"imageSize": "2K"}
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert est["input_shapes"] == {"9:16": 2}  # 90x160: the nearest ratio the model supports
    assert est["assumed_latency_s"] == {"nanobanana_pro": 18.0}
    text = run_cli("estimate", str(path)).stdout
    assert "2 items send none and keep their first reference image's shape (9:16 x2)" in text
    assert "assuming ~18s an image for nanobanana_pro" in text and "raise concurrency" in text
    assert re.search(r"reference images: 2 sent \(\d+ KiB\)", text)  # binary units, named so
    bad = write_spec(tmp_path, image_configs=[{"aspect_ratio": None}])
    assert "image_configs[0].aspect_ratio" in run_cli("estimate", str(bad)).stderr  # given, it must be a ratio


@pytest.mark.parametrize("api_format", ["nanobanana", "openai-compatible", "gemini"])
def test_the_mock_keeps_the_input_shape_and_the_size_check_expects_it(
    tmp_path: Path, gateway: StartGateway, api_format: str
) -> None:
    gw = gateway(flavor=api_format)
    for name, size, fmt in (
        ("wide.png", (160, 90), "PNG"),
        ("tall.jpg", (90, 160), "JPEG"),
        ("odd.webp", (100, 70), "WEBP"),
    ):
        (tmp_path / name).write_bytes(picture(*size, seed=3, fmt=fmt))
    prompts = [
        {"id": n.split(".")[0], "prompt": f"edit {n}", "images": [n]} for n in ("wide.png", "tall.jpg", "odd.webp")
    ]
    prompts.append({"id": "none", "prompt": "no reference"})
    path = write_spec(
        tmp_path, gw.base_url, image_configs=[{}], model="nanobanana", prompts=prompts, api_format=api_format
    )
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    shapes = {r["prompt_id"]: (r["width"], r["height"]) for r in read_manifest(tmp_path / "out")}
    assert nearest_ratio("nanobanana", 100, 70) == "3:2"  # 1.43: nearer 3:2 (1.5) than 4:3 (1.33)
    expected = {"wide": "16:9", "tall": "9:16", "odd": "3:2", "none": "1:1"}  # no reference image: a square
    assert shapes == {pid: scaled_size("nanobanana", ratio, None, 8) for pid, ratio in expected.items()}
    report = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert report["size_mismatches"] == []
    assert {row["aspect_ratio"] for row in report["pixel_sizes"]} == {
        "16:9 (input's shape)", "9:16 (input's shape)", "3:2 (input's shape)", "1:1 (input's shape)"}  # fmt: skip


# --- item 6: paths in prompt files ---------------------------------------------------------------------


def test_image_paths_in_a_prompt_file_are_relative_to_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "products").mkdir(parents=True)
    (data / "products" / "mug.png").write_bytes(picture(16, 16, seed=1))
    (tmp_path / "products").mkdir()
    (tmp_path / "products" / "mug.png").write_bytes(picture(16, 16, seed=2))  # the spec's folder has another
    (tmp_path / "products" / "lamp.png").write_bytes(picture(16, 16, seed=3))  # only beside the spec
    (data / "edits.csv").write_text(
        "id,prompt,images\nm,edit the mug,products/mug.png\nl,edit the lamp,products/lamp.png\n"
    )
    path = write_spec(tmp_path, prompts=None, prompt_files=["data/edits.csv"])
    spec = load_spec(path)
    items = {i.prompt_id: i for i in iter_items(spec)}
    assert items["m"].inputs[0].path == str(data / "products" / "mug.png")  # beside the CSV wins
    assert items["l"].inputs[0].path == str(tmp_path / "products" / "lamp.png")  # the old reading, still read...
    (warning,) = spec.warnings  # ...with a warning naming it
    assert "prompt_files[0]: image paths in edits.csv are read relative to it" in warning
    assert "products/lamp.png exist only relative to the spec's folder" in warning
    proc = run_cli("estimate", str(path))
    assert proc.returncode == 0


# --- item 2: report and the drift note -----------------------------------------------------------------


def test_report_holds_the_spec_items_and_falls_back_when_the_spec_is_gone(
    tmp_path: Path, gateway: StartGateway
) -> None:
    gw = gateway()
    path = write_spec(tmp_path, gw.base_url, prompts=["a", "b", "c"])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    path = write_spec(tmp_path, gw.base_url, prompts=["a", "b"])  # c is gone, nothing run since
    out = str(tmp_path / "out")
    text = run_cli("report", out).stdout
    assert "items     2  (ok 2, failed 0)" in text and "left out  1 older item whose records the spec" in text
    assert json.loads(run_cli("report", out, "--json", "--all-records").stdout)["items"] == 3
    assert run_cli("report", out, "--html", str(tmp_path / "g.html")).returncode == 0  # the gallery: the same items
    page = (tmp_path / "g.html").read_text()
    assert page.count('"ok"') >= 1 and "1 older item no longer in the spec left out" in page
    assert len(json.loads(re.search(r'id="gallery-data">(.*?)</script>', page, re.S).group(1))["id"]) == 2  # type: ignore[union-attr]
    proc = run_cli("export", out, "--to", str(tmp_path / "d"))
    assert "wrote 2 items" in proc.stderr and "left out 1 older item whose records" in proc.stderr
    path.unlink()  # the spec is gone: every record, said
    summary = json.loads(run_cli("report", out, "--json").stdout)
    assert summary["items"] == 3 and "job.yaml is gone" in summary["records_note"]
    path.write_text("name: [broken")
    assert "no longer checks" in json.loads(run_cli("report", out, "--json").stdout)["records_note"]


def test_the_drift_note_comes_with_the_run_that_caused_it(tmp_path: Path, gateway: StartGateway) -> None:
    """A changed reference image leaves the spec's text as it was: the run that sends the new items says so,
    and the next one says nothing more."""
    gw = gateway()
    (tmp_path / "ref.png").write_bytes(picture(16, 16, seed=1))
    path = write_spec(tmp_path, gw.base_url, prompts=[{"prompt": "edit", "images": ["ref.png"]}, "plain"])
    assert "spec changed" not in run_cli("run", str(path), "--no-progress").stderr
    (tmp_path / "ref.png").write_bytes(picture(16, 16, seed=2))
    changed = run_cli("run", str(path), "--no-progress").stderr
    assert "1 new items, 1 recorded items are no longer in the spec" in changed
    assert "spec changed" not in run_cli("run", str(path), "--no-progress").stderr


# --- item 7: the smaller things -------------------------------------------------------------------------


def test_money_and_counts_as_people_read_them() -> None:
    assert [usd(x) for x in (0, 0.0004, 0.0011, 0.134, 1.875)] == ["$0.00", "<$0.001", "$0.001", "$0.134", "$1.88"]
    text = format_quality({"duplicates": [["a", "b"]], "near_duplicates": [["c", "d", "e"], ["f", "g"]],
                           "near_duplicates_note": "dHash"})  # type: ignore[typeddict-item]  # fmt: skip
    assert "byte-identical images: 1 group (2 items), e.g. a, b" in text
    assert "near duplicates: 2 groups (5 items), e.g. c, d, e (dHash)" in text


def test_the_quick_start_installs_what_the_demo_report_needs() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") : text.index("## The job spec")]
    assert "pip install -q -e '.[images]' && .venv/bin/runner run jobs/demo.yaml --mock" in quick
    extras = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^images = \["pillow', extras, re.M)


def test_the_current_items_of_an_edit_chain_include_the_children_of_done_parents(
    tmp_path: Path, gateway: StartGateway
) -> None:
    """A chain's children have ids only once their parents' images exist: report and export count them
    as the spec's items (spec_item_ids walks the done parents), not as older records."""
    gw = gateway()
    prompts = [
        {"id": "base", "template": "a studio photo of a {product}", "vars": {"product": ["mug", "lamp"]}},
        {"id": "edit", "template": "put it in a {room}", "images": ["@base"], "vars": {"room": ["kitchen", "loft"]}},
    ]
    path = write_spec(tmp_path, gw.base_url, prompts=prompts)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    out = str(tmp_path / "out")
    summary = json.loads(run_cli("report", out, "--json").stdout)
    assert (summary["items"], summary["spec_items"], summary["older_records"]) == (6, 6, 0)
    proc = run_cli("export", out, "--to", str(tmp_path / "d"))
    assert "wrote 6 items" in proc.stderr and "left out" not in proc.stderr
    assert "spec changed" not in run_cli("run", str(path), "--no-progress").stderr  # a rerun: no drift
