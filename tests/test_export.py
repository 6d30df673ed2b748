"""runner export: imagefolder and WebDataset from output dirs written by hand, loaded with the real libraries."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from runner import __version__
from runner.errors import UsageError
from runner.export import Filters, export_imagefolder, export_webdataset, var_columns
from runner.quality import LocalSource
from tests.test_quality import OutDir, item_id, picture

from .conftest import StartGateway, read_manifest, run_cli, write_spec

SUMMARY = {
    "name": "rooftop-cats",
    "ok": 14,
    "failed": 3,
    "failures_by_kind": {"content_filter": 2, "server_error": 1},
    "cost_usd": 1.876,
    "first_finished_at": "2026-11-25T08:00:00+00:00",
    "last_finished_at": "2026-11-25T09:13:00+00:00",
    "runs": 2,
    "sources": [{"base_url": "https://api.getinfinityblue.com/v1", "api_format": "nanobanana"}],
}


def build(root: Path) -> OutDir:
    """14 ok items (one a byte copy of another, one the wrong shape, one without its file) and one
    failed; every item sends a house-style reference image, one a URL too; items 1-6 carry no
    labels and no params, the rest do (so the first five samples alone would not show them)."""
    out = OutDir(root)
    style = out.stored_input(picture(32, 32, seed=500), "refs/style.png")
    for n in range(1, 15):
        kw: dict[str, Any] = {"minute": n}
        if n >= 7:
            kw["vars_"] = {"subject": ["cat", "fox", "heron"][n % 3], "style": "ink" if n % 2 else "oil"}
        if n == 9:  # names that clash with fixed columns or look like image paths to the loader
            kw["vars_"] = {"subject": "cat", "prompt": "clash", "source_file_name": "x.png"}
        if n >= 8:
            kw["params"] = {"seed": 1234 + n} if n != 13 else {"seed": 1234 + n, "temperature": 0.7}
        inputs = [style, *([{"url": "https://example.com/beach.jpg"}] if n == 12 else [])]
        data = picture(128, 128, seed=n) if n != 5 else picture(128, 128, seed=4)  # 5 repeats 4's image
        if n == 5:
            data = (root / out.records[3]["image_path"]).read_bytes()
        out.add(n, picture(160, 90, seed=n) if n == 6 else data, inputs=inputs, **kw)
    out.records[5]["image_config"]["aspect_ratio"] = "1:1"  # 16:9 pixels for a 1:1 request
    out.add(15, None, error="content_filter", minute=15)
    out.write()
    (root / out.records[13]["image_path"]).unlink()  # item 14's image is gone
    return out


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> OutDir:
    return build(tmp_path_factory.mktemp("export") / "out")


@pytest.fixture(scope="module")
def datasets_lib() -> Iterator[Any]:
    """The real `datasets` (slow to import: once per module), with its cache in a temp dir."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    yield datasets


def ids(*numbers: int) -> list[str]:
    return [item_id(n) for n in numbers]


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- imagefolder -------------------------------------------------------------------------------


def test_imagefolder_rows_files_and_skips(outdir: OutDir, tmp_path: Path) -> None:
    dest = tmp_path / "dist"
    result = export_imagefolder(outdir.records, LocalSource(outdir.root), dest, summary=SUMMARY)  # type: ignore[arg-type]
    assert result.written == 13 and result.files == ["metadata.jsonl", "README.md"]
    assert result.skipped == {"failed": 1, "missing_image": 1}
    assert result.examples == {"failed": ids(15), "missing_image": ids(14)}
    rows = rows_of(dest / "metadata.jsonl")
    assert [r["item_id"] for r in rows] == ids(*range(1, 14))
    style = outdir.records[0]["inputs"][0]["stored"]
    assert rows[8] == {
        "file_name": f"images/{item_id(9)[:2]}/{item_id(9)}.png",
        "item_id": item_id(9), "prompt_id": "p0", "prompt": "prompt number 9", "model": "nanobanana_pro",
        "aspect_ratio": "1:1", "image_size": None, "repeat": 1, "width": 128, "height": 128,
        "var_prompt": "clash", "var_source_file_name_value": "x.png", "style": None, "subject": "cat",
        "params": '{"seed": 1243}', "input_images_file_names": [style], "input_urls": [],
    }  # fmt: skip
    assert rows[5]["width"] == 160 and rows[11]["input_urls"] == ["https://example.com/beach.jpg"]
    assert rows[0]["params"] is None and rows[0]["subject"] is None
    for r in rows:  # one schema: every column on every line, every file in dest
        assert list(r) == list(rows[0])
        assert (dest / r["file_name"]).is_file() and (dest / style).is_file()
    # hardlinked, not copied (same filesystem): 13 images and the one reference image
    assert (result.linked, result.copied) == (14, 0)
    assert os.path.samefile(dest / rows[0]["file_name"], outdir.root / rows[0]["file_name"])
    assert not [p for p in dest.rglob("*.tmp")]
    again = export_imagefolder(outdir.records, LocalSource(outdir.root), dest)  # type: ignore[arg-type]
    assert again.written == 13 and again.linked == 0  # already there: replaced, not appended
    assert len(rows_of(dest / "metadata.jsonl")) == 13


def test_imagefolder_in_place_through_the_cli(tmp_path: Path) -> None:
    out = OutDir(tmp_path / "out dir#1")
    out.add(1, picture(64, 64, seed=1), vars_={"prompt": "p", "model": "m", "file_name": "f"})
    out.add(2, picture(64, 64, seed=2))
    out.write()
    (out.root / out.records[1]["image_path"]).unlink()
    proc = run_cli("export", str(out.root))
    assert proc.returncode == 0, proc.stderr
    assert "skipped: 1 missing image" in proc.stderr and "needs Pillow" in proc.stderr
    path = out.root / "metadata.jsonl"
    rows = rows_of(path)
    assert len(rows) == 1 and rows[0]["prompt"] == "prompt number 1"
    assert (rows[0]["var_prompt"], rows[0]["var_model"], rows[0]["var_file_name_value"]) == ("p", "m", "f")
    card = (out.root / "README.md").read_text()  # the CLI writes the card beside the metadata
    assert "was not recorded" in card and "SynthID" not in card  # a dir written by hand names no source
    result = export_imagefolder(out.records, LocalSource(out.root), out.root)  # type: ignore[arg-type]
    assert (result.linked, result.copied, result.written) == (0, 0, 1)  # dest is the output dir: nothing to place
    assert var_columns({"a", "var_a", "file_name", "image", "x_file_names"}) == {
        "a": "a", "file_name": "var_file_name_value", "image": "var_image", "var_a": "var_a",
        "x_file_names": "var_x_file_names_value",
    }  # fmt: skip
    assert run_cli("export", str(tmp_path / "empty")).returncode == 2


def test_filters(outdir: OutDir, tmp_path: Path) -> None:
    source = LocalSource(outdir.root)
    both = Filters(exclude_duplicates=True, exclude_mismatched=True)
    result = export_imagefolder(outdir.records, source, tmp_path / "a", filters=both)  # type: ignore[arg-type]
    assert [r["item_id"] for r in rows_of(tmp_path / "a" / "metadata.jsonl")] == ids(
        1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13
    )
    assert result.skipped == {"failed": 1, "missing_image": 1, "size_mismatch": 1, "duplicate": 1}
    assert result.examples["duplicate"] == ids(5) and result.examples["size_mismatch"] == ids(6)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Byte-identical duplicates removed: 1" in card and "size mismatch: 1" in card

    where = Filters(where=Filters.parse_where(["subject=cat", "style=oil"]))
    result = export_webdataset(outdir.records, source, tmp_path / "w", filters=where)  # type: ignore[arg-type]
    assert result.written == 1 and result.skipped == {"failed": 1, "where": 13}  # 9 and 12 are cats; only 12 in oil
    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as tar:
        assert tar.getnames() == [f"{item_id(12)}.png", f"{item_id(12)}.json", f"{item_id(12)}.input0.png"]
    with pytest.raises(UsageError, match="VAR=VALUE"):
        Filters.parse_where(["subject"])
    with pytest.raises(UsageError, match="no item has a label named colour"):  # a typo: nothing is written
        export_imagefolder(outdir.records, source, tmp_path / "n", filters=Filters(where=(("colour", "red"),)))  # type: ignore[arg-type]
    assert not (tmp_path / "n" / "metadata.jsonl").exists()


def test_imagefolder_loads_with_datasets(outdir: OutDir, tmp_path: Path, datasets_lib: Any) -> None:
    dest = tmp_path / "dist"
    export_imagefolder(outdir.records, LocalSource(outdir.root), dest, summary=SUMMARY)  # type: ignore[arg-type]
    ds = datasets_lib.load_dataset("imagefolder", data_dir=str(dest), split="train", cache_dir=str(tmp_path / "c"))
    assert len(ds) == 13
    for column in (
        "image",
        "prompt",
        "subject",
        "style",
        "var_prompt",
        "var_source_file_name_value",
        "params",
        "input_urls",
    ):
        assert column in ds.column_names
    assert isinstance(ds.features["input_images"], datasets_lib.List)
    assert isinstance(ds.features["input_images"].feature, datasets_lib.Image)
    row = ds[8]
    assert row["item_id"] == item_id(9) and row["subject"] == "cat" and row["var_prompt"] == "clash"
    assert row["image"].size == (128, 128) and row["image"].convert("RGB").getpixel((0, 0)) is not None
    assert [im.size for im in row["input_images"]] == [(32, 32)]
    assert ds[11]["input_urls"] == ["https://example.com/beach.jpg"]
    assert ds[0]["subject"] is None
    # The card's YAML features are exactly what the loader makes of the files.
    header = yaml.safe_load((dest / "README.md").read_text().split("---\n")[1])
    card_features = datasets_lib.Features._from_yaml_list(header["dataset_info"]["features"])
    assert card_features == ds.features


# --- webdataset --------------------------------------------------------------------------------


def test_webdataset_shards_samples_and_order(outdir: OutDir, tmp_path: Path) -> None:
    dest = tmp_path / "wds"
    dest.mkdir()
    (dest / "shard-000009.tar").write_bytes(b"stale")  # from an earlier, larger export
    result = export_webdataset(outdir.records, LocalSource(outdir.root), dest, shard_size=4, summary=SUMMARY)  # type: ignore[arg-type]
    assert result.written == 13 and result.skipped == {"failed": 1, "missing_image": 1}
    assert result.files == [f"shard-00000{i}.tar" for i in range(4)] + ["README.md"]
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", *(f"shard-00000{i}.tar" for i in range(4))]
    keys: list[str] = []
    for shard in sorted(dest.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert len(names) == 3 * min(4, 13 - len(keys))
            for k in range(0, len(names), 3):
                key = names[k].split(".")[0]
                assert names[k : k + 3] == [f"{key}.png", f"{key}.json", f"{key}.input0.png"]
                keys.append(key)
            doc = json.load(tar.extractfile(names[1]))  # type: ignore[arg-type]
            assert doc["item_id"] == names[0].split(".")[0]
    # first the samples that show every key (labels, the clashing ones, temperature, a URL), then the rest in order
    assert keys[:3] == ids(9, 12, 13)
    assert keys[3:] == ids(1, 2, 3, 4, 5, 6, 7, 8, 10, 11)
    with tarfile.open(dest / "shard-000000.tar") as tar:
        doc = json.load(tar.extractfile(f"{item_id(9)}.json"))  # type: ignore[arg-type]
        info = tar.getmember(f"{item_id(9)}.png")
    assert doc["vars"] == {"prompt": "clash", "source_file_name": "x.png", "style": None, "subject": "cat"}
    assert doc["params"] == {"seed": 1243, "temperature": None}
    assert doc["inputs"][0]["file"] == "input0.png" and doc["inputs"][0]["path"] == "refs/style.png"
    assert doc["image_config"] == {"aspect_ratio": "1:1", "image_size": None}  # as sent: none was
    assert doc["usage"]["completion_tokens"] == 1120 and doc["cost_usd"] == 0.134
    assert info.size == (outdir.root / outdir.records[8]["image_path"]).stat().st_size and info.mtime > 0
    with pytest.raises(ValueError, match="at least 1"):
        export_webdataset(outdir.records, LocalSource(outdir.root), dest, shard_size=0)  # type: ignore[arg-type]


def test_webdataset_library_reads_every_sample(outdir: OutDir, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    dest = tmp_path / "wds"
    export_webdataset(outdir.records, LocalSource(outdir.root), dest, shard_size=5)  # type: ignore[arg-type]
    urls = [str(p) for p in sorted(dest.glob("shard-*.tar"))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about its own defaults (shardshuffle)
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 13
    by_key = {s["__key__"]: s for s in samples}
    assert set(by_key) == set(ids(*range(1, 14)))
    sample = by_key[item_id(7)]
    assert sample["png"].size == (128, 128) and sample["input0.png"].size == (32, 32)
    assert sample["json"]["vars"]["subject"] == "fox" and sample["json"]["prompt"] == "prompt number 7"


def test_webdataset_loads_with_datasets(outdir: OutDir, tmp_path: Path, datasets_lib: Any) -> None:
    dest = tmp_path / "wds"
    export_webdataset(outdir.records, LocalSource(outdir.root), dest, shard_size=4, summary=SUMMARY)  # type: ignore[arg-type]
    ds = datasets_lib.load_dataset(
        "webdataset", data_files=str(dest / "shard-*.tar"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert len(ds) == 13
    assert set(ds.column_names) == {"png", "json", "input0.png", "__key__", "__url__"}
    assert set(ds.features["json"]["vars"]) == {"prompt", "source_file_name", "style", "subject"}
    by_key = {row["__key__"]: row for row in ds}
    assert by_key[item_id(13)]["json"]["params"] == {"seed": 1247, "temperature": 0.7}  # not cut to an int
    assert by_key[item_id(8)]["json"]["vars"] == {
        "prompt": None,
        "source_file_name": None,
        "style": "oil",
        "subject": "heron",
    }
    assert by_key[item_id(1)]["json"]["vars"]["subject"] is None
    assert by_key[item_id(12)]["json"]["inputs"][1]["url"] == "https://example.com/beach.jpg"
    assert by_key[item_id(7)]["png"].size == (128, 128) and by_key[item_id(7)]["input0.png"].size == (32, 32)
    header = yaml.safe_load((dest / "README.md").read_text().split("---\n")[1])
    card_features = datasets_lib.Features._from_yaml_list(header["dataset_info"]["features"])
    assert card_features == datasets_lib.Features({k: ds.features[k] for k in card_features})
    assert set(card_features) == set(ds.features)


def test_webdataset_mixed_files_get_one_name_per_role(tmp_path: Path) -> None:
    """A PNG and a JPEG image: one member name (PNG, converted losslessly); a sample with an extra
    image comes first, in a shard of its own, so the loader sees that member and the other gets None."""
    out = OutDir(tmp_path / "out")
    out.add(1, picture(64, 64, seed=1))
    out.add(2, picture(64, 64, seed=2, fmt="JPEG"), mime="image/jpeg", extra=[picture(64, 64, seed=3)])
    out.write()
    result = export_webdataset(out.records, LocalSource(out.root), tmp_path / "w")  # type: ignore[arg-type]
    assert result.written == 2 and result.files == ["shard-000000.tar", "shard-000001.tar", "README.md"]
    assert any("converted losslessly to PNG" in w for w in result.warnings)
    with tarfile.open(tmp_path / "w" / "shard-000000.tar") as tar:
        assert tar.getnames() == [f"{item_id(2)}.png", f"{item_id(2)}.json", f"{item_id(2)}.extra1.png"]
        converted = tar.extractfile(f"{item_id(2)}.png").read()  # type: ignore[union-attr]
        doc = json.load(tar.extractfile(f"{item_id(2)}.json"))  # type: ignore[arg-type]
    with tarfile.open(tmp_path / "w" / "shard-000001.tar") as tar:
        assert tar.getnames() == [f"{item_id(1)}.png", f"{item_id(1)}.json"]
    assert converted.startswith(b"\x89PNG") and (doc["mime"], doc["image_file_mime"]) == ("image/jpeg", "image/png")
    original = (out.root / out.records[1]["image_path"]).read_bytes()
    with Image.open(io.BytesIO(converted)) as a, Image.open(io.BytesIO(original)) as b:
        assert a.tobytes() == b.convert(a.mode).tobytes()  # the JPEG's decoded pixels, exactly
    assert "converted losslessly" in (tmp_path / "w" / "README.md").read_text()


# --- the dataset card --------------------------------------------------------------------------


def test_card_says_how_the_data_was_made(outdir: OutDir, tmp_path: Path) -> None:
    dest = tmp_path / "dist"
    filters = Filters(exclude_duplicates=True)
    export_webdataset(outdir.records, LocalSource(outdir.root), dest, filters=filters, summary=SUMMARY)  # type: ignore[arg-type]
    text = (dest / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "unknown" and "FILL IN the license" in text
    assert header["task_categories"] == ["image-to-image"]  # reference images were sent
    assert header["size_categories"] == ["n<1K"] and header["pretty_name"] == "rooftop-cats"
    assert header["configs"][0]["data_files"][0]["path"] == "shard-*.tar"
    body = text.split("---\n", 2)[2]
    assert "# rooftop-cats" in body and "12 synthetic images" in body
    assert "| nanobanana\\_pro (Gemini 3 Pro Image) | 1:1 | 1K | 12 |" in body
    assert "through the gateway at api.getinfinityblue.com (api\\_format nanobanana)" in body
    assert "Items requested: 17; succeeded: 14; failed: 3." in body
    assert "between 2026-11-25T08:00:00+00:00 and 2026-11-25T09:13:00+00:00" in body
    assert "Cost: $1.88" in body and "Runs (resumed sessions): 2." in body
    assert (
        "| content\\_filter | 2 | refusal: image blocked by the safety filter |" in body
        and "| server\\_error | 1 |  |" in body
    )
    assert "Refusals (the model or its filters declined): 2." in body
    assert "Byte-identical duplicates removed: 1" in body and "missing image: 1" in body
    assert "SynthID" in body and f"runner {__version__}" in body
    assert "- `json` (struct): the request and its record" in body
    assert "- `input0.png` (image): the source image at position 0" in body
    assert "the **source** is `input0.png`" in body and "**result** is `png`" in body  # an edit dataset


def test_card_text_to_image_without_inputs(tmp_path: Path) -> None:
    out = OutDir(tmp_path / "out")
    out.add(1, picture(64, 64, seed=1), ratio="1:1", model="nanobanana")
    out.write()
    export_imagefolder(out.records, LocalSource(out.root), out.root)  # type: ignore[arg-type]
    header = yaml.safe_load((out.root / "README.md").read_text().split("---\n")[1])
    assert header["task_categories"] == ["text-to-image"]
    assert header["dataset_info"]["features"][0] == {"name": "image", "dtype": "image"}
    assert "rooftop" not in (out.root / "README.md").read_text()
    text = (out.root / "README.md").read_text()
    assert "Generated between 2026-11-25T08:00:00.000+00:00 and 2026-11-25T08:00:00.000+00:00" in text
    assert "Cost of the exported images: $0.13" in text  # no run summary given: from the records


class Remote(LocalSource):
    """A source with no local files (an object store): exports copy through open()."""

    def local_path(self, rel: str) -> Path | None:
        return None


def test_copies_from_a_source_without_local_files(outdir: OutDir, tmp_path: Path) -> None:
    result = export_imagefolder(outdir.records, Remote(outdir.root), tmp_path / "d", card=False)  # type: ignore[arg-type]
    assert (result.written, result.linked, result.copied) == (13, 0, 14)
    rows = rows_of(tmp_path / "d" / "metadata.jsonl")
    for r in rows:
        copy = tmp_path / "d" / r["file_name"]
        assert copy.read_bytes() == (outdir.root / r["file_name"]).read_bytes()
        assert not os.path.samefile(copy, outdir.root / r["file_name"])
    assert result.files == ["metadata.jsonl"] and not (tmp_path / "d" / "README.md").exists()


def test_an_item_with_a_missing_file_is_skipped_in_both_formats(tmp_path: Path) -> None:
    out = OutDir(tmp_path / "out")
    gone = out.stored_input(picture(16, 16, seed=7), "refs/gone.png")
    out.add(1, picture(64, 64, seed=1), inputs=[gone])
    out.add(2, picture(64, 64, seed=2), extra=[picture(64, 64, seed=3)])
    out.add(3, picture(64, 64, seed=4))
    out.write()
    (out.root / gone["stored"]).unlink()
    (out.root / out.records[1]["extra_images"][0]["image_path"]).unlink()
    for export_to in (export_imagefolder, export_webdataset):
        result = export_to(out.records, LocalSource(out.root), tmp_path / export_to.__name__)  # type: ignore[operator, arg-type]
        assert result.written == 1 and result.skipped == {"missing_file": 2}, export_to
        assert result.examples == {"missing_file": ids(1, 2)}


def test_a_mock_run_with_repeated_and_misshapen_answers_end_to_end(
    tmp_path: Path, gateway: StartGateway, datasets_lib: Any
) -> None:
    """Issue 15's finish line: the report names exactly the repeated and misshapen items, the export
    leaves them out when asked, loads with `datasets`, and the card tells the run as it was."""
    gw = gateway()
    prompts = [f"p{i}" for i in range(6)] + ["dup a [fault:same_image]", "dup b [fault:same_image]"]
    prompts += ["odd [fault:wrong_shape]", "refused [fault:content_filter]"]
    tpl = {"id": "t", "template": "{x}", "vars": {"x": prompts}}
    path = write_spec(tmp_path, gw.base_url, prompts=[tpl], image_configs=[{"aspect_ratio": "16:9"}])
    assert run_cli("run", str(path), "--no-progress").returncode == 1
    out = tmp_path / "out"
    recs = {r["prompt"]: r for r in read_manifest(out)}
    rep = json.loads(run_cli("report", str(out), "--json").stdout)
    dups = {recs["dup a [fault:same_image]"]["item_id"], recs["dup b [fault:same_image]"]["item_id"]}
    assert len(rep["duplicates"]) == 1 and set(rep["duplicates"][0]) == dups
    assert rep["size_mismatches"] == [recs["odd [fault:wrong_shape]"]["item_id"]]
    text = run_cli("report", str(out)).stdout
    assert "byte-identical images: 1 group (2 items)" in text and "not the aspect ratio asked for" in text

    dest = tmp_path / "dist"
    proc = run_cli(
        "export", str(out), "--format", "webdataset", "--to", str(dest), "--exclude-duplicates", "--exclude-mismatched"
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 7 items" in proc.stderr and "1 duplicate" in proc.stderr and "1 size mismatch" in proc.stderr
    ds = datasets_lib.load_dataset("webdataset", data_files=str(dest / "shard-*.tar"), split="train")
    kept = {row["json"]["vars"]["x"] for row in ds} - {f"p{i}" for i in range(6)}
    assert len(ds) == 7 and kept in ({"dup a [fault:same_image]"}, {"dup b [fault:same_image]"})
    card = (dest / "README.md").read_text()
    assert "content\\_filter" in card and f"runner {__version__}" in card
    assert "through the gateway at 127.0.0.1" in card and "SynthID" in card  # a gateway (the mock, unknown to runner)
