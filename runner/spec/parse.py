"""Load a YAML job spec, check every rule once, and return frozen dataclasses."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import SpecError
from . import chains, checks
from .checks import Checker, check_url, describe
from .inputs import Inputs
from .prompts import Context, PromptEntry, PromptFile, check_inline_only, prompt_entry, prompt_file, resolve
from .values import DEFAULT_CONFIG, ImageConfig, Params
from .yamlfile import load_yaml

DEFAULT_BASE_URL = "https://api.getinfinityblue.com/v1"
GOOGLE_API_HOST = "generativelanguage.googleapis.com"
GEMINI_BASE_URL = f"https://{GOOGLE_API_HOST}/v1beta"  # the default for api_format gemini
GEMINI_KEY_ENV = "GEMINI_API_KEY"  # the default api_key_env for api_format gemini
MODES = ("interactive", "batch")
BATCH_KEYS = {"max_requests", "poll_s"}
API_FORMATS = ("nanobanana", "openai-compatible", "gemini")
TOP_KEYS = {
    "name", "model", "image_configs", "repeats", "prompts", "prompt_files", "output_dir",
    "base_url", "api_key_env", "concurrency", "requests_per_minute", "max_attempts",
    "timeout_s", "max_cost_usd", "pricing", "max_consecutive_failures", "backoff_base_s", "backoff_max_s",
    "images", "params", "api_format", "max_response_mb", "notify_url", "on_finish", "mode", "batch", "model_ids",
}  # fmt: skip


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
    api_format: str = "nanobanana"
    mode: str = "interactive"  # or batch: Google's Batch API (api_format gemini only)
    batch_max_requests: int = 100  # items per batch: sized by its results file (~3.5 MB a 1K image line)
    batch_poll_s: float = 60.0  # seconds between status checks of open batches
    model_ids: tuple[tuple[str, str], ...] = ()  # runner model -> the Gemini API's id, over the built-in defaults
    images: tuple[str, ...] = ()  # references sent first with every prompt
    params: Params = ()  # top-level params (prompts carry them merged already)
    max_response_mb: float = 64.0
    notify_url: str | None = None
    on_finish: str | None = None
    warnings: tuple[str, ...] = ()
    inputs: Inputs = field(default_factory=lambda: Inputs(Path(".")), compare=False, repr=False)

    @property
    def chained(self) -> bool:
        """Does any prompt feed on another's images (an edit chain)?"""
        return any(p.link is not None for p in self.prompts)

    def children_of(self, prompt_id: str) -> tuple[PromptEntry, ...]:
        """The prompts chained to this one (`@prompt_id` in their images)."""
        return tuple(p for p in self.prompts if p.link is not None and p.link.parent == prompt_id)


def load_spec(path: str | Path) -> JobSpec:
    """Read and check a job spec; raise SpecError naming the file and key on any problem."""
    path = Path(path)
    file = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(file, "", "file not found") from None
    except OSError as e:
        raise SpecError(file, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(file, "", f"line {line}: not valid UTF-8; save the spec as UTF-8") from None
    return parse_spec(load_yaml(text, file), path)


def parse_spec(raw: Any, path: Path) -> JobSpec:
    c = Checker(str(path))
    base = path.parent
    top = c.mapping(raw, "", TOP_KEYS) if raw is not None else c.mapping({}, "", TOP_KEYS)
    if "name" not in top:
        raise c.fail("name", "required key is missing")
    name = c.string(top["name"], "name")
    if not name.isprintable():  # a line break or an escape would reach terminals, logs and the dataset card as is
        raise c.fail("name", f"must be one line of printable text (it names the run in messages), got {name!r}")
    model = c.model(top["model"], "model") if "model" in top else None
    configs = (
        c.configs(top["image_configs"], "image_configs") if "image_configs" in top else (ImageConfig(DEFAULT_CONFIG),)
    )
    repeats = c.integer(top.get("repeats", 1), "repeats", 1, 10_000)
    inputs = Inputs(base)
    images = checks.refs(c, top.get("images"), "images")
    for i, ref in enumerate(images):
        resolve(c, inputs, ref, f"images[{i}]")
    params = checks.params(c, top.get("params"), "params", {}, repeats)
    api_format = top.get("api_format", "nanobanana")
    if api_format not in API_FORMATS:
        raise c.fail("api_format", f"expected one of {', '.join(API_FORMATS)}, got {describe(api_format)}")
    ctx = Context(c, base, inputs, images, dict(params), model, configs, repeats, api_format)
    check_inline_only(ctx, [img for ref in images for img in inputs.resolve(ref)], "images")

    prompts: list[PromptEntry] = []
    ids: set[str] = set()
    raw_prompts = top.get("prompts") or []
    if not isinstance(raw_prompts, list):
        raise c.fail("prompts", f"expected a list, got {describe(raw_prompts)}")
    links = chains.prescan(c.file, raw_prompts)
    for i, p in enumerate(raw_prompts):
        entry = prompt_entry(ctx, p, f"prompts[{i}]", links.get(i))
        if entry.prompt_id in ids:
            raise c.fail(f"prompts[{i}].id", f"duplicate prompt id {entry.prompt_id!r}")
        ids.add(entry.prompt_id)
        prompts.append(entry)

    raw_files = checks.as_list(c, top.get("prompt_files"), "prompt_files")
    if raw_files:
        if model is None:
            raise c.fail("model", "required when prompt_files are given (file prompts use the default model)")
        c.check_support(model, configs, "image_configs")
    files = [prompt_file(ctx, f, f"prompt_files[{i}]") for i, f in enumerate(raw_files)]
    if not prompts and not any(f.count for f in files):
        raise c.fail("prompts", "the spec has no prompts (give `prompts` or `prompt_files`)")

    out = top.get("output_dir")
    output_dir: Path | str
    if (
        out is not None
        and "://" in c.string(out, "output_dir")
        and not c.string(out, "output_dir").startswith("file://")
    ):
        output_dir = c.string(out, "output_dir")
    else:
        output_dir = Path(
            os.path.normpath(base / c.string(out, "output_dir") if out is not None else base / "out" / name)
        )
    gemini = api_format == "gemini"
    base_url = c.string(top.get("base_url", GEMINI_BASE_URL if gemini else DEFAULT_BASE_URL), "base_url").rstrip("/")
    if (problem := check_url(base_url)) is not None:
        raise c.fail("base_url", problem)
    key_env = c.string(top.get("api_key_env", GEMINI_KEY_ENV if gemini else "NANOBANANA_API_KEY"), "api_key_env")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        raise c.fail(
            "api_key_env", "expected the NAME of an environment variable (the key itself never goes in a spec)"
        )
    mode = top.get("mode", "interactive")
    if mode not in MODES:
        raise c.fail("mode", f"expected one of {', '.join(MODES)}, got {describe(mode)}")
    if mode == "batch" and not gemini:
        raise c.fail(
            "mode",
            "batch mode is Google's own Batch API: it needs api_format: gemini (a chat gateway has no batch endpoint)",
        )
    batch = c.mapping(top["batch"], "batch", BATCH_KEYS) if top.get("batch") is not None else {}
    model_ids = checks.model_ids(c, top.get("model_ids"))
    notify = top.get("notify_url")
    if notify is not None and (problem := check_url(c.string(notify, "notify_url"))) is not None:
        raise c.fail("notify_url", problem)
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
        pricing=checks.pricing(c, top.get("pricing")),
        fingerprint=_fingerprint(prompts, files, model, configs, repeats, images, params),
        api_format=api_format,
        mode=mode,
        batch_max_requests=c.integer(batch.get("max_requests", 100), "batch.max_requests", 1, 50_000),
        batch_poll_s=c.number(batch.get("poll_s", 60.0), "batch.poll_s", 0, strict=True),
        model_ids=model_ids,
        images=images,
        params=params,
        max_response_mb=c.number(top.get("max_response_mb", 64), "max_response_mb", 0, strict=True),
        notify_url=None if notify is None else str(notify).strip(),
        on_finish=None if top.get("on_finish") is None else c.string(top["on_finish"], "on_finish"),
        warnings=tuple(ctx.warnings),
        inputs=inputs,
    )


def _fingerprint(
    prompts: list[PromptEntry],
    files: list[PromptFile],
    model: str | None,
    configs: tuple[ImageConfig, ...],
    repeats: int,
    images: tuple[str, ...],
    params: Params,
) -> str:
    h = hashlib.sha256(repr((prompts, model, configs, repeats, images, params)).encode())
    for f in files:
        st = f.path.stat()
        h.update(f"{f.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_google(url: str) -> bool:
    """Is `url` Google's own API (https, its host)? A key may go there without being told to."""
    parts = urlsplit(url)
    return parts.scheme == "https" and parts.hostname == GOOGLE_API_HOST


def spec_summary(spec: JobSpec) -> dict[str, Any]:
    """A JSON-able description of the spec, saved in the output dir to explain drift later."""
    return {
        "name": spec.name,
        "spec_path": str(spec.spec_path.absolute()),  # report and export read the spec's items from it
        "fingerprint": spec.fingerprint,
        "model": spec.model,
        "image_configs": [c.as_sent() for c in spec.image_configs],
        "repeats": spec.repeats,
        "prompts": len(spec.prompts),
        "prompt_files": {str(f.path): f.count for f in spec.prompt_files},
        "api_format": spec.api_format,
        "mode": spec.mode,
        # edit chains: which prompt edits which one's images (the report's steps, before any edit is made)
        "chain": {p.prompt_id: p.link.parent for p in spec.prompts if p.link is not None},
    }
