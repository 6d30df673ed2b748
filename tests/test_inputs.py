"""Reference images and request parameters: sent in order, recorded, priced, limited, and any gateway's shape."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from runner.mock import MockGateway, render_image, request_digest
from runner.spec import ImageConfig, load_spec
from runner.spec.items import item_id, iter_items

from .conftest import StartGateway, latest, read_manifest, run_cli, write_spec

ROOT = Path(__file__).resolve().parent.parent


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG."""
    out, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            out[key.decode()] = value.decode()
        pos += 12 + length
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """The example job's reference images, copied so a test may change them."""
    shutil.copytree(ROOT / "sample_prompts" / "refs", tmp_path / "refs")
    return tmp_path


def scene_spec(directory: Path, base_url: str, **fields: Any) -> Path:
    template = {
        "id": "scenes",
        "template": "Place the {product} from image 1 into the scene in image 2",
        "images": ["refs/{product}.png", "refs/scene-{scene}.png"],
        "vars": {"product": ["mug", "lamp", "vase"], "scene": ["beach", "kitchen"]},
    }
    return write_spec(directory, base_url, prompts=[template], params={"seed": 1234}, repeats=2, **fields)


def test_every_request_carries_exactly_its_images_in_order_and_the_image_answers_them(
    scenes: Path, mock: MockGateway
) -> None:
    path = scene_spec(scenes, mock.base_url)
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = scenes / "out"
    recs = list(latest(out).values())
    assert len(recs) == 12  # 3 products x 2 scenes x 2 repeats
    sent = {(r["prompt"], r["params"]["seed"], tuple(r["inputs"])) for r in mock.stats()["requests_log"]}
    assert len(sent) == 12 == mock.stats()["requests"]
    for rec in recs:
        product, scene = rec["vars"]["product"], rec["vars"]["scene"]
        want = [sha(scenes / "refs" / f"{product}.png"), sha(scenes / "refs" / f"scene-{scene}.png")]
        assert rec["params"] == {"seed": 1234 + rec["repeat"]}  # repeats differ, reproducibly
        assert (rec["prompt"], rec["params"]["seed"], tuple(want)) in sent
        assert [i["sha256"] for i in rec["inputs"]] == want
        assert [i["path"] for i in rec["inputs"]] == [f"refs/{product}.png", f"refs/scene-{scene}.png"]
        for ref in rec["inputs"]:  # the output dir keeps a copy of each reference image, once
            assert sha(out / ref["stored"]) == ref["sha256"] and ref["mime"] == "image/png"
        digest = request_digest(rec["model"], rec["prompt"], "1:1", "1K", want, rec["params"])
        assert png_text((out / rec["image_path"]).read_bytes())["runner-mock-request"] == digest
    assert len(list((out / "inputs").rglob("*.png"))) == 5
    rep = json.loads(run_cli("report", str(out), "--json").stdout)
    assert rep["inputs"]["refs/scene-beach.png"] == 6 and rep["distinct_inputs"] == 5


def test_changing_one_reference_file_reruns_exactly_its_items(scenes: Path, mock: MockGateway) -> None:
    path = scene_spec(scenes, mock.base_url)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    (scenes / "refs" / "mug.png").write_bytes(render_image(40, 30, b"a new mug photo"))
    est = json.loads(run_cli("estimate", str(path), "--json").stdout)
    assert (est["items"], est["done"], est["remaining"]) == (12, 8, 4)
    assert est["input_images"] == 8 and est["estimated_input_cost_usd"] == pytest.approx(8 * 0.0011)
    before = mock.stats()["requests"]
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert mock.stats()["requests"] == before + 4
    again = [r for r in read_manifest(scenes / "out")][-4:]
    assert {r["vars"]["product"] for r in again} == {"mug"}


def test_ids_of_prompts_without_images_or_params_stay_as_they_were(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(render_image(8, 8, b"a"))
    path = write_spec(tmp_path, prompts=["a cat", {"id": "with-image", "prompt": "a cat", "images": ["a.png"]}])
    items = list(iter_items(load_spec(path)))
    plain = item_id("nanobanana_pro", "a cat", ImageConfig("1:1"), 0)
    assert items[0].item_id == plain and items[1].item_id != plain and len(items) == 2


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            {"prompt": "x", "model": "nanobanana", "images": ["a.png"] * 4},
            "4 reference images; nanobanana takes at most 3",
        ),
        ({"prompt": "x", "images": ["big.png"]}, "over the 20 MiB cap (largest image big.png: 16.0 MiB)"),
        ({"prompt": "x", "images": ["text.png"]}, "not a png, jpeg, webp, heic or heif image (by its first bytes)"),
        ({"prompt": "x", "images": ["gone.png"]}, "file not found"),
        ({"prompt": "x", "images": ["refs/*.jpg"]}, "the pattern matches no file"),
    ],
)
def test_limits_are_refused_before_anything_is_sent(
    tmp_path: Path, mock: MockGateway, prompt: dict[str, Any], expected: str
) -> None:
    (tmp_path / "a.png").write_bytes(render_image(8, 8, b"a"))
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16 * 2**20 - 8))
    (tmp_path / "text.png").write_text("not an image at all")
    path = write_spec(tmp_path, mock.base_url, prompts=[prompt])
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 2 and expected in proc.stderr and "prompts[0].images" in proc.stderr, proc.stderr
    assert mock.stats()["requests"] == 0


def test_globs_expand_in_sorted_order_and_urls_go_as_they_are(scenes: Path, mock: MockGateway) -> None:
    url = "https://example.com/beach.jpg"
    path = write_spec(scenes, mock.base_url, images=["refs/scene-*.png"], prompts=[{"prompt": "x", "images": [url]}])
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    (entry,) = mock.stats()["requests_log"]
    assert entry["inputs"] == [sha(scenes / "refs/scene-beach.png"), sha(scenes / "refs/scene-kitchen.png"), url]
    (rec,) = read_manifest(scenes / "out")
    assert rec["inputs"][2] == {"url": url}


@pytest.mark.parametrize(
    ("flavor", "answer_format", "api_format", "ok"),
    [
        ("nanobanana", "images", "nanobanana", True),  # the image in message.images: read in either format
        ("openai-compatible", None, "openai-compatible", True),
        ("openai-compatible", "markdown", "openai-compatible", True),
        ("openai-compatible", None, "nanobanana", False),  # a literal extra_body is an unknown field there
    ],
)
def test_any_openai_compatible_gateway(
    scenes: Path, gateway: StartGateway, flavor: str, answer_format: str | None, api_format: str, ok: bool
) -> None:
    gw = gateway(flavor=flavor, answer_format=answer_format)
    path = scene_spec(scenes, gw.base_url, api_format=api_format, image_configs=[{"aspect_ratio": "16:9"}])
    proc = run_cli("run", str(path), "--no-progress")
    recs = list(latest(scenes / "out").values())
    if not ok:  # every request refused alike: the circuit breaker stops the run
        assert proc.returncode == 3 and "circuit breaker" in proc.stderr, proc.stderr
        assert {r["error"]["kind"] for r in recs} == {"bad_request"} and "extra_body" in recs[0]["error"]["message"]
        return
    assert proc.returncode == 0, proc.stderr
    assert all(r["status"] == "ok" and (r["width"], r["height"]) == (172, 96) for r in recs)  # 16:9 at 1/8 scale
    log = gw.stats()["requests_log"]
    assert {e["config_from"] for e in log} == {"top_level" if api_format == "openai-compatible" else "extra_body"}
    assert {e["image_config"]["aspect_ratio"] for e in log} == {"16:9"}
