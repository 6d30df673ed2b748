"""Spec checking: every mistake is exit 2 with FILE: key.path: problem, no traceback, nothing sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.spec import load_spec

from .conftest import MockGateway, run_cli, write_spec

GOOD = """
name: ok
model: nanobanana_pro
image_configs:
  - {aspect_ratio: "16:9", image_size: "2K"}
  - {aspect_ratio: "1:1"}
prompts:
  - Draw a cat
  - {id: fox, prompt: A red fox, model: nanobanana, image_configs: [{aspect_ratio: "4:3"}]}
"""


def spec_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_a_good_spec_loads_into_frozen_dataclasses(tmp_path: Path) -> None:
    spec = load_spec(spec_file(tmp_path, GOOD))
    assert spec.name == "ok"
    assert [p.prompt_id for p in spec.prompts][1] == "fox"
    assert spec.prompts[1].model == "nanobanana"
    assert spec.image_configs[0].as_sent() == {"aspect_ratio": "16:9", "image_size": "2K"}
    assert spec.image_configs[1].as_sent() == {"aspect_ratio": "1:1"}
    assert spec.output_dir == tmp_path / "out" / "ok"
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


BAD = [
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\ncolour: red\n", "colour: unknown key"),
    ("model: nanobanana_pro\nprompts: [a]\n", "name: required key is missing"),
    ("name: x\nmodel: nanobanana_9\nprompts: [a]\n", "model: unknown model 'nanobanana_9'"),
    ("name: x\nmodel: nanobanana_pro\nimage_configs: [{aspect_ratio: 16:9}]\nprompts: [a]\n", "image_configs[0].aspect_ratio: write ratios in quotes"),
    ("name: x\nmodel: nanobanana_pro\nimage_configs: [{aspect_ratio: '1:4'}]\nprompts: [a]\n", "does not support aspect ratio '1:4'"),
    ("name: x\nmodel: nanobanana_pro\nimage_configs: [{aspect_ratio: '1:1', image_size: 1k}]\nprompts: [a]\n", "image_configs[0].image_size: nanobanana_pro does not support image_size '1k' (sizes are uppercase)"),
    ("name: x\nmodel: nanobanana\nimage_configs: [{aspect_ratio: '1:1', image_size: 2K}]\nprompts: [a]\n", "nanobanana takes no image_size"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{prompt: a, colour: red}]\n", "prompts[0].colour: unknown key"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: a}]\n", "prompts[0].prompt: required key is missing"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: a, prompt: b}, {id: a, prompt: c}]\n", "prompts[1].id: duplicate prompt id 'a'"),
    ("name: x\nmodel: nanobanana_pro\nprompt_files: [missing.txt]\n", "prompt_files[0]: file not found"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\nconcurrency: 0\n", "concurrency: must be between 1 and 1024"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\nconcurrency: lots\n", "concurrency: expected a whole number"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\napi_key_env: sk-abc123\n", "api_key_env: expected the NAME"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\npricing: {nanobanana_pro: {8K: 1}}\n", "pricing.nanobanana_pro.8K: nanobanana_pro has no size '8K'"),
    ("name: x\nprompts: [a]\n", "model: required"),
    ("name: x\nmodel: nanobanana_pro\n", "prompts: the spec has no prompts"),
    ("name: x\nmodel: [unclosed\n", "not valid YAML: line"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: t, template: 'a {subject} {mood}', vars: {subject: [cat]}}]\n", "prompts[0].template: placeholder {mood} has no variable in vars"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: t, template: 'a {subject}', vars: {subject: [cat], mood: [calm]}}]\n", "prompts[0].vars.mood: variable 'mood' is not used in the template"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: t, template: 'a {s} {m}', vars: {s: [a, b], m: [c]}, combine: zip}]\n", "prompts[0].combine: zip needs lists of equal length (s=2, m=1)"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{id: t, template: 'a {s}', vars: {s: []}}]\n", "prompts[0].vars.s: the list of values is empty"),
    # issue 11: say what YAML did, and where
    ("name: x\nmodel: nanobanana_pro\nprompts:\n  - A cat: the sequel\n", "prompts[0]: YAML read this prompt as a mapping ('A cat': 'the sequel') because of the ': ' in it; put the whole prompt in quotes"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [yes, no]\n", "prompts[0]: expected a mapping, got true (YAML reads yes/no/on/off/true/false unquoted as true/false: put it in quotes)"),
    ("name: x\nmodel: nanobanana\nmodel: nanobanana_pro\nprompts: [a]\n", "line 3, column 1: key 'model' is given twice (first on line 2)"),
    ("name: x\nmodel: nanobanana_pro\nimage_configs: [{aspect_ratio: '1:1', image_size: 2K}]\nprompts: [{prompt: a, model: nanobanana}]\n", "prompts[0].model: nanobanana takes no image_size (it always makes ~1K images), but this prompt inherits the top-level image_configs[0]"),
    # issue 10: hostile values
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\nmax_cost_usd: .nan\n", "max_cost_usd: expected a finite number"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [a]\nbase_url: 'http://u:p@h/v1'\n", "base_url: the URL holds a user name or password"),
    # issue 14: reference images and params
    ("name: x\nmodel: nanobanana_pro\nprompts: [{prompt: a, images: [nope.png]}]\n", "prompts[0].images[0]: file not found"),
    ("name: x\nmodel: nanobanana_pro\nprompts: [{prompt: a, images: ['ftp://h/x.png']}]\n", "only local files and http(s) URLs"),
    ("name: x\nmodel: nanobanana_pro\nparams: {seed: 0}\nprompts: [a]\n", "params.seed: seed + repeat (0..0) must stay a non-zero 32-bit integer"),
    ("name: x\nmodel: nanobanana_pro\nparams: {temperature: 3}\nprompts: [a]\n", "params.temperature: must be at most 2"),
    ("name: x\nmodel: nanobanana_pro\napi_format: openai\nprompts: [a]\n", "api_format: expected one of nanobanana, openai-compatible"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_specs_name_file_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = spec_file(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


def test_cli_bad_spec_is_exit_2_without_traceback_and_sends_nothing(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url, image_configs=[{"aspect_ratio": "1:1", "image_size": "1k"}])
    for cmd in ("run", "estimate"):
        proc = run_cli(cmd, str(path))
        assert proc.returncode == 2, proc.stderr
        assert f"{path}: image_configs[0].image_size:" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert mock.stats()["requests"] == 0
    assert not (tmp_path / "out").exists()


def test_prompt_file_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": \n')
    (tmp_path / "p.csv").write_text("id,text\na,one\n")
    (tmp_path / "v.csv").write_text("subject\ncat\n")
    cases = [
        ("prompt_files: [p.jsonl]", "prompt_files[0]: ", "p.jsonl: line 2: not valid JSON"),
        ("prompt_files: [p.csv]", "prompt_files[0]: ", "no 'prompt' column (columns: id, text)"),
        (
            "prompts: [{id: t, template: 'a {s}', vars: {s: {file: v.csv, column: animal}}}]",
            "prompts[0].vars.s.column: ",
            "no column 'animal' (columns: subject)",
        ),
    ]
    for body, key, problem in cases:
        path = spec_file(tmp_path, f"name: x\nmodel: nanobanana_pro\n{body}\n")
        with pytest.raises(SpecError) as err:
            load_spec(path)
        assert f"{path}: {key}" in str(err.value) and problem in str(err.value)


def test_missing_key_is_a_usage_error_naming_the_variable(tmp_path: Path, mock: MockGateway) -> None:
    path = write_spec(tmp_path, mock.base_url)
    proc = run_cli("run", str(path), "--no-progress", key=None)
    assert proc.returncode == 2
    assert "RUNNER_TEST_KEY" in proc.stderr and "--mock" in proc.stderr
    assert mock.stats()["requests"] == 0


def test_help_texts_carry_examples() -> None:
    for cmd in ("run", "estimate", "report", "export", "mock-server"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0
        assert "example" in proc.stdout


def test_sample_larger_than_the_combinations_warns(tmp_path: Path) -> None:
    text = "name: x\nmodel: nanobanana_pro\nprompts: [{id: t, template: 'a {s}', vars: {s: [a, b]}, sample: 10}]\n"
    path = spec_file(tmp_path, text)
    assert load_spec(path).warnings == ("prompts[0]: sample 10 is more than the 2 combinations: every one is used",)
    proc = run_cli("estimate", str(path))
    assert proc.returncode == 0 and "warning: prompts[0]: sample 10 is more than the 2 combinations" in proc.stdout
