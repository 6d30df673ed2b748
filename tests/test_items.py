"""Items: stable ids, one item per identical request, shards, templates, estimates."""

from __future__ import annotations

import json
from pathlib import Path

from runner.engine.plan import estimate
from runner.spec import ImageConfig, load_spec
from runner.spec.items import Shard, item_id, iter_items

from .conftest import run_cli


def spec(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text("name: t\nmodel: nanobanana_pro\n" + body)
    return path


def test_item_id_is_a_hash_of_exactly_the_request() -> None:
    a = item_id("nanobanana_pro", "a cat", ImageConfig("1:1", "2K"), 0)
    assert a == item_id("nanobanana_pro", "a cat", ImageConfig("1:1", "2K"), 0)
    assert len(a) == 20 and int(a, 16) >= 0
    others = {
        item_id("nanobanana_2", "a cat", ImageConfig("1:1", "2K"), 0),
        item_id("nanobanana_pro", "a cat!", ImageConfig("1:1", "2K"), 0),
        item_id("nanobanana_pro", "a cat", ImageConfig("16:9", "2K"), 0),
        item_id("nanobanana_pro", "a cat", ImageConfig("1:1", None), 0),
        item_id("nanobanana_pro", "a cat", ImageConfig("1:1", "2K"), 1),
    }
    assert a not in others and len(others) == 5


def test_expansion_is_a_matrix_with_repeats_and_duplicates_collapse(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a cat\n\n# comment\na dog\n")
    (tmp_path / "p.csv").write_text("id,prompt\nc1,a cow\nc2,a cat\n")
    path = spec(
        tmp_path,
        "image_configs: [{aspect_ratio: '1:1'}, {aspect_ratio: '16:9', image_size: 4K}]\nrepeats: 2\n"
        "prompts: [a cat, {id: hen, prompt: a hen, repeats: 1}]\nprompt_files: [p.txt, p.csv]\n",
    )
    items = list(iter_items(load_spec(path)))
    # a cat (inline) x2 configs x2 repeats + hen x2 configs x1 + dog x4 + cow x4; the file's "a cat" is the same request
    assert len(items) == 4 + 2 + 4 + 4
    assert len({i.item_id for i in items}) == len(items)
    assert {i.prompt_id for i in items} == {"p_" + items[0].prompt_id[2:], "hen", "p-4", "c1"}
    assert [i.item_id for i in iter_items(load_spec(path))] == [i.item_id for i in items]


def test_shards_partition_the_items(tmp_path: Path) -> None:
    path = spec(tmp_path, "prompts: [" + ", ".join(f"p{n}" for n in range(200)) + "]\n")
    loaded = load_spec(path)
    every = {i.item_id for i in iter_items(loaded)}
    parts = [{i.item_id for i in iter_items(loaded, Shard(k, 3))} for k in range(3)]
    assert set().union(*parts) == every
    assert sum(len(p) for p in parts) == len(every)
    assert all(40 < len(p) < 95 for p in parts)


TEMPLATE = """prompts:
  - id: animals
    template: "a {subject} in {style} style, {lighting}"
    vars:
      subject: [cat, red fox, heron]
      style: {file: styles.txt}
      lighting: [golden hour, overcast]
"""


def test_template_product_zip_and_labels(tmp_path: Path) -> None:
    (tmp_path / "styles.txt").write_text("ink\nwatercolor\n")
    items = list(iter_items(load_spec(spec(tmp_path, TEMPLATE))))
    assert len(items) == 3 * 2 * 2
    for i in items:
        assert i.prompt == f"a {i.vars['subject']} in {i.vars['style']} style, {i.vars['lighting']}"
        assert i.prompt_id == "animals"
    zipped = spec(
        tmp_path,
        "prompts: [{id: z, template: '{a} and {b}', vars: {a: [x, y], b: [1, 2]}, combine: zip}]\n",
        "zip.yaml",
    )
    assert [i.prompt for i in iter_items(load_spec(zipped))] == ["x and 1", "y and 2"]


def test_sample_is_reproducible_and_growing_it_keeps_earlier_items(tmp_path: Path) -> None:
    (tmp_path / "styles.txt").write_text("ink\nwatercolor\n")

    def ids(sample: int, seed: int) -> list[str]:
        body = TEMPLATE + f"    sample: {sample}\n    seed: {seed}\n"
        return [i.item_id for i in iter_items(load_spec(spec(tmp_path, body, f"s{sample}-{seed}.yaml")))]

    five = ids(5, 7)
    assert len(five) == 5 and five == ids(5, 7)
    assert set(five) < set(ids(8, 7))
    assert set(five) != set(ids(5, 8))
    assert len(ids(50, 7)) == 12


def test_templated_and_hand_written_specs_give_the_same_items_and_estimate(tmp_path: Path) -> None:
    (tmp_path / "styles.txt").write_text("ink\nwatercolor\n")
    templated = load_spec(spec(tmp_path, TEMPLATE))
    prompts = [i.prompt for i in iter_items(templated)]
    by_hand = load_spec(spec(tmp_path, "prompts:\n" + "".join(f"  - {json.dumps(p)}\n" for p in prompts), "hand.yaml"))
    assert [i.item_id for i in iter_items(templated)] == [i.item_id for i in iter_items(by_hand)]
    a, b = estimate(templated, tmp_path / "none"), estimate(by_hand, tmp_path / "none")
    assert (a["items"], a["estimated_cost_usd"]) == (b["items"], b["estimated_cost_usd"]) == (12, 12 * 0.134)


def test_estimate_json_counts_and_override_prices(tmp_path: Path) -> None:
    path = spec(
        tmp_path,
        "image_configs: [{aspect_ratio: '1:1', image_size: 4K}, {aspect_ratio: '1:1'}]\nrepeats: 3\n"
        "prompts: [a, b, {prompt: c, model: nanobanana, image_configs: [{aspect_ratio: '1:1'}]}]\n"
        "pricing: {nanobanana_pro: {4K: 0.5}, nanobanana: 0.01}\nconcurrency: 2\nrequests_per_minute: 6\n",
    )
    proc = run_cli("estimate", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["items"] == 2 * 2 * 3 + 3 and est["done"] == 0 and est["remaining"] == 15
    assert est["estimated_cost_usd"] == round(6 * 0.5 + 6 * 0.134 + 3 * 0.01, 6)
    rows = {(r["model"], r["image_size"]): (r["count"], r["cost_usd"]) for r in est["by_model"]}
    assert rows == {
        ("nanobanana", "1K"): (3, 0.03),
        ("nanobanana_pro", "1K"): (6, 0.804),
        ("nanobanana_pro", "4K"): (6, 3.0),
    }
    assert est["estimated_time_s"] == 15 * 10.0  # 6 requests a minute bounds it
