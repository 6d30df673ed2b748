"""Load a YAML job spec, check every rule once, and return frozen dataclasses."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .models import MODELS
from .remote import is_remote
from .sources import columns, file_kind, iter_prompts
from .templates import Template, parse_template

DEFAULT_BASE_URL = "https://api.getinfinityblue.com/v1"
TOP_KEYS = {
    "name", "model", "image_configs", "repeats", "prompts", "prompt_files", "output_dir",
    "base_url", "api_key_env", "concurrency", "requests_per_minute", "max_attempts",
    "timeout_s", "max_cost_usd", "pricing", "max_consecutive_failures", "backoff_base_s", "backoff_max_s",
}  # fmt: skip
PROMPT_KEYS = {"id", "prompt", "model", "image_configs", "repeats"}
TEMPLATE_KEYS = {"id", "template", "vars", "combine", "sample", "seed", "model", "image_configs", "repeats"}
CONFIG_KEYS = {"aspect_ratio", "image_size"}


@dataclass(frozen=True)
class ImageConfig:
    aspect_ratio: str
    image_size: str | None = None

    def as_sent(self) -> dict[str, str]:
        """The `image_config` object exactly as the request carries it."""
        d = {"aspect_ratio": self.aspect_ratio}
        if self.image_size is not None:
            d["image_size"] = self.image_size
        return d


@dataclass(frozen=True)
class PromptEntry:
    """One inline prompt or template; model/configs/repeats already resolved."""

    prompt_id: str
    model: str
    image_configs: tuple[ImageConfig, ...]
    repeats: int
    text: str | None = None
    template: Template | None = None


@dataclass(frozen=True)
class PromptFile:
    path: Path
    kind: str
    count: int  # prompts in the file, counted when the spec was checked


@dataclass(frozen=True)
class JobSpec:
    name: str
    spec_path: Path
    model: str | None
    image_configs: tuple[ImageConfig, ...]
    repeats: int
    prompts: tuple[PromptEntry, ...]
    prompt_files: tuple[PromptFile, ...]
    output_dir: Path | str  # a local directory, or an fsspec URL (s3://...) kept as written
    base_url: str
    api_key_env: str
    concurrency: int
    requests_per_minute: float
    max_attempts: int
    timeout_s: float
    max_cost_usd: float | None
    max_consecutive_failures: int
    backoff_base_s: float
    backoff_max_s: float
    pricing: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]
    fingerprint: str  # hash of what decides the items: changes mean spec drift


class _Checker:
    """Reads values out of the YAML tree, naming file and key path in every error."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(self.file, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(allowed))})"
                raise self.fail(_join(key, str(k)), f"unknown key{hint}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value.strip()

    def integer(self, value: Any, key: str, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {_kind(value)}")
        if value < lo or (hi is not None and value > hi):
            raise self.fail(key, f"must be between {lo} and {hi}" if hi else f"must be at least {lo}")
        return value

    def number(self, value: Any, key: str, lo: float, *, strict: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {_kind(value)}")
        if value < lo or (strict and value == lo):
            raise self.fail(key, f"must be {'greater than' if strict else 'at least'} {lo}")
        return float(value)

    def model(self, value: Any, key: str) -> str:
        name = self.string(value, key)
        if name not in MODELS:
            raise self.fail(key, f"unknown model {name!r} (known: {', '.join(MODELS)})")
        return name

    def configs(self, value: Any, key: str) -> tuple[ImageConfig, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a non-empty list of {aspect_ratio, image_size} mappings")
        out = []
        for i, raw in enumerate(value):
            k = f"{key}[{i}]"
            m = self.mapping(raw, k, CONFIG_KEYS)
            ratio = m.get("aspect_ratio")
            if isinstance(ratio, int) and not isinstance(ratio, bool):
                raise self.fail(
                    f"{k}.aspect_ratio", 'write ratios in quotes, e.g. "16:9" (YAML reads 16:9 as a number)'
                )
            ratio = self.string(ratio, f"{k}.aspect_ratio")
            size = m.get("image_size")
            if isinstance(size, int) and not isinstance(size, bool):
                size = str(size)
            if size is not None:
                size = self.string(size, f"{k}.image_size")
            out.append(ImageConfig(ratio, size))
        return tuple(out)

    def check_support(self, model: str, configs: tuple[ImageConfig, ...], key: str) -> None:
        info = MODELS[model]
        for i, c in enumerate(configs):
            if c.aspect_ratio not in info.aspect_ratios:
                raise self.fail(
                    f"{key}[{i}].aspect_ratio",
                    f"{model} does not support aspect ratio {c.aspect_ratio!r} (supported: {' '.join(info.aspect_ratios)})",
                )
            if c.image_size is None:
                continue
            if not info.sizes:
                raise self.fail(f"{key}[{i}].image_size", f"{model} takes no image_size (it always makes ~1K images)")
            if c.image_size not in info.sizes:
                hint = " (sizes are uppercase)" if c.image_size.upper() in info.sizes else ""
                raise self.fail(
                    f"{key}[{i}].image_size",
                    f"{model} does not support image_size {c.image_size!r}{hint} (supported: {' '.join(info.sizes)})",
                )


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a job spec; raise SpecError naming the file and key on any problem."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(file, "", f"not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    return parse_spec(raw, path)


def parse_spec(raw: Any, path: Path) -> JobSpec:
    c = _Checker(str(path))
    base = path.parent
    top = c.mapping(raw, "", TOP_KEYS) if raw is not None else c.mapping({}, "", TOP_KEYS)
    if "name" not in top:
        raise c.fail("name", "required key is missing")
    name = c.string(top["name"], "name")
    model = c.model(top["model"], "model") if "model" in top else None
    configs = c.configs(top["image_configs"], "image_configs") if "image_configs" in top else (ImageConfig("1:1"),)
    repeats = c.integer(top.get("repeats", 1), "repeats", 1, 10_000)

    prompts: list[PromptEntry] = []
    ids: set[str] = set()
    raw_prompts = top.get("prompts") or []
    if not isinstance(raw_prompts, list):
        raise c.fail("prompts", f"expected a list, got {_kind(raw_prompts)}")
    for i, p in enumerate(raw_prompts):
        entry = _prompt_entry(c, p, f"prompts[{i}]", model, configs, repeats, base)
        if entry.prompt_id in ids:
            raise c.fail(f"prompts[{i}].id", f"duplicate prompt id {entry.prompt_id!r}")
        ids.add(entry.prompt_id)
        prompts.append(entry)

    files: list[PromptFile] = []
    raw_files = top.get("prompt_files") or []
    if not isinstance(raw_files, list):
        raise c.fail("prompt_files", f"expected a list of paths, got {_kind(raw_files)}")
    for i, f in enumerate(raw_files):
        files.append(_prompt_file(c, f, f"prompt_files[{i}]", base))
    if files:
        if model is None:
            raise c.fail("model", "required when prompt_files are given (file prompts use the default model)")
        c.check_support(model, configs, "image_configs")
    if not prompts and not any(f.count for f in files):
        raise c.fail("prompts", "the spec has no prompts (give `prompts` or `prompt_files`)")

    out = top.get("output_dir")
    output_dir: Path | str
    if out is not None and is_remote(c.string(out, "output_dir")):
        output_dir = c.string(out, "output_dir")
    else:
        output_dir = Path(
            os.path.normpath(base / c.string(out, "output_dir") if out is not None else base / "out" / name)
        )
    base_url = c.string(top.get("base_url", DEFAULT_BASE_URL), "base_url").rstrip("/")
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise c.fail("base_url", f"expected an http(s) URL, got {base_url!r}")
    key_env = c.string(top.get("api_key_env", "NANOBANANA_API_KEY"), "api_key_env")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        raise c.fail(
            "api_key_env", "expected the NAME of an environment variable (the key itself never goes in a spec)"
        )
    max_cost = top.get("max_cost_usd")
    return JobSpec(
        name=name,
        spec_path=path,
        model=model,
        image_configs=configs,
        repeats=repeats,
        prompts=tuple(prompts),
        prompt_files=tuple(files),
        output_dir=output_dir,
        base_url=base_url,
        api_key_env=key_env,
        concurrency=c.integer(top.get("concurrency", 8), "concurrency", 1, 1024),
        requests_per_minute=c.number(top.get("requests_per_minute") or 0, "requests_per_minute", 0),
        max_attempts=c.integer(top.get("max_attempts", 5), "max_attempts", 1, 100),
        timeout_s=c.number(top.get("timeout_s", 300), "timeout_s", 0, strict=True),
        max_cost_usd=None if max_cost is None else c.number(max_cost, "max_cost_usd", 0, strict=True),
        max_consecutive_failures=c.integer(top.get("max_consecutive_failures", 10), "max_consecutive_failures", 1),
        backoff_base_s=c.number(top.get("backoff_base_s", 1.0), "backoff_base_s", 0),
        backoff_max_s=c.number(top.get("backoff_max_s", 60.0), "backoff_max_s", 0),
        pricing=_pricing(c, top.get("pricing")),
        fingerprint=_fingerprint(prompts, files, model, configs, repeats),
    )


def _prompt_entry(
    c: _Checker, p: Any, key: str, model: str | None, configs: tuple[ImageConfig, ...], repeats: int, base: Path
) -> PromptEntry:
    if isinstance(p, str):
        text = c.string(p, key)
        if model is None:
            raise c.fail("model", f"required: {key} names no model of its own")
        c.check_support(model, configs, "image_configs")
        return PromptEntry(_derived_id(text), model, configs, repeats, text=text)
    is_template = isinstance(p, dict) and "template" in p
    m = c.mapping(p, key, TEMPLATE_KEYS if is_template else PROMPT_KEYS)
    own_model = c.model(m["model"], f"{key}.model") if "model" in m else model
    if own_model is None:
        raise c.fail(f"{key}.model", "no model: set `model` at the top of the spec or on this prompt")
    own_configs = c.configs(m["image_configs"], f"{key}.image_configs") if "image_configs" in m else configs
    c.check_support(own_model, own_configs, f"{key}.image_configs" if "image_configs" in m else "image_configs")
    own_repeats = c.integer(m.get("repeats", repeats), f"{key}.repeats", 1, 10_000)
    pid = str(m["id"]).strip() if m.get("id") not in (None, "") else None
    if is_template:
        tpl = parse_template(c.file, key, m, base)
        return PromptEntry(pid or f"t_{tpl.digest[:8]}", own_model, own_configs, own_repeats, template=tpl)
    if "prompt" not in m:
        raise c.fail(f"{key}.prompt", "required key is missing")
    text = c.string(m["prompt"], f"{key}.prompt")
    return PromptEntry(pid or _derived_id(text), own_model, own_configs, own_repeats, text=text)


def _prompt_file(c: _Checker, f: Any, key: str, base: Path) -> PromptFile:
    path = base / c.string(f, key)
    kind = file_kind(path, c.file, key)
    cols = columns(path, kind)
    if cols is not None and "prompt" not in cols:
        raise c.fail(key, f"{path}: no 'prompt' column (columns: {', '.join(sorted(cols)) or 'none'})")
    count = 0
    try:  # one streaming pass, so a bad line is a spec error now and not a crash mid-run
        for _ in iter_prompts(path, kind):
            count += 1
    except (ValueError, UnicodeDecodeError) as e:
        raise c.fail(key, f"{path}: {e}") from None
    return PromptFile(path, kind, count)


def _pricing(c: _Checker, raw: Any) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
    if raw is None:
        return ()
    m = c.mapping(raw, "pricing", set(MODELS))
    out = []
    for model, prices in m.items():
        info = MODELS[model]
        sizes = info.sizes or (info.default_size,)
        if not isinstance(prices, dict):  # one price for every size
            out.append((model, tuple((s, c.number(prices, f"pricing.{model}", 0)) for s in sizes)))
            continue
        table = []
        for size, price in prices.items():
            size = str(size)
            if size not in sizes:
                raise c.fail(f"pricing.{model}.{size}", f"{model} has no size {size!r} (sizes: {' '.join(sizes)})")
            table.append((size, c.number(price, f"pricing.{model}.{size}", 0)))
        out.append((model, tuple(table)))
    return tuple(out)


def _fingerprint(
    prompts: list[PromptEntry],
    files: list[PromptFile],
    model: str | None,
    configs: tuple[ImageConfig, ...],
    repeats: int,
) -> str:
    h = hashlib.sha256(repr((prompts, model, configs, repeats)).encode())
    for f in files:
        st = f.path.stat()
        h.update(f"{f.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _derived_id(text: str) -> str:
    return "p_" + hashlib.sha256(text.encode()).hexdigest()[:8]


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}.get(type(value), f"{value!r}")


def spec_summary(spec: JobSpec) -> dict[str, Any]:
    """A JSON-able description of the spec, saved in the output dir to explain drift later."""
    return {
        "name": spec.name,
        "spec_path": str(spec.spec_path),
        "fingerprint": spec.fingerprint,
        "model": spec.model,
        "image_configs": [c.as_sent() for c in spec.image_configs],
        "repeats": spec.repeats,
        "prompts": len(spec.prompts),
        "prompt_files": {str(f.path): f.count for f in spec.prompt_files},
    }
