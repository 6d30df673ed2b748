"""Load a YAML job spec, check every rule once, and return frozen dataclasses."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecError
from . import chains, checks
from .chains import Link
from .checks import Checker, check_url, describe
from .inputs import InputError, InputImage, Inputs, check_request
from .sources import columns, file_kind, iter_prompts
from .templates import Template, parse_template, placeholders
from .values import DEFAULT_CONFIG, ImageConfig, Params
from .yamlfile import load_yaml

DEFAULT_BASE_URL = "https://api.getinfinityblue.com/v1"
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"  # the default for api_format gemini
MODES = ("interactive", "batch")
BATCH_KEYS = {"max_requests", "poll_s"}
API_FORMATS = ("nanobanana", "openai-compatible", "gemini")
TOP_KEYS = {
    "name", "model", "image_configs", "repeats", "prompts", "prompt_files", "output_dir",
    "base_url", "api_key_env", "concurrency", "requests_per_minute", "max_attempts",
    "timeout_s", "max_cost_usd", "pricing", "max_consecutive_failures", "backoff_base_s", "backoff_max_s",
    "images", "params", "api_format", "max_response_mb", "notify_url", "on_finish", "mode", "batch", "model_ids",
}  # fmt: skip
PROMPT_KEYS = {"id", "prompt", "model", "image_configs", "repeats", "images", "params", "vars"}
TEMPLATE_KEYS = {"id", "template", "vars", "combine", "sample", "seed", "model", "image_configs", "repeats"}
TEMPLATE_KEYS |= {"images", "params"}


@dataclass(frozen=True)
class PromptEntry:
    """One inline prompt or template; model/configs/repeats/params already resolved."""

    prompt_id: str
    model: str
    image_configs: tuple[ImageConfig, ...]
    repeats: int
    text: str | None = None
    template: Template | None = None
    images: tuple[str, ...] = ()  # its own references (templates may hold {placeholders}), after the top-level ones
    params: Params = ()
    labels: tuple[tuple[str, str], ...] = ()  # `vars` of a plain prompt
    link: Link | None = None  # an edit chain: `@ID` in its images names its parent prompt


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
        _resolve(c, inputs, ref, f"images[{i}]")
    params = checks.params(c, top.get("params"), "params", {}, repeats)
    api_format = top.get("api_format", "nanobanana")
    if api_format not in API_FORMATS:
        raise c.fail("api_format", f"expected one of {', '.join(API_FORMATS)}, got {describe(api_format)}")
    ctx = _Context(c, base, inputs, images, dict(params), model, configs, repeats, api_format)
    _check_inline_only(ctx, [img for ref in images for img in inputs.resolve(ref)], "images")

    prompts: list[PromptEntry] = []
    ids: set[str] = set()
    raw_prompts = top.get("prompts") or []
    if not isinstance(raw_prompts, list):
        raise c.fail("prompts", f"expected a list, got {describe(raw_prompts)}")
    links = chains.prescan(c.file, raw_prompts)
    for i, p in enumerate(raw_prompts):
        entry = _prompt_entry(ctx, p, f"prompts[{i}]", links.get(i))
        if entry.prompt_id in ids:
            raise c.fail(f"prompts[{i}].id", f"duplicate prompt id {entry.prompt_id!r}")
        ids.add(entry.prompt_id)
        prompts.append(entry)

    raw_files = checks.as_list(c, top.get("prompt_files"), "prompt_files")
    if raw_files:
        if model is None:
            raise c.fail("model", "required when prompt_files are given (file prompts use the default model)")
        c.check_support(model, configs, "image_configs")
    files = [_prompt_file(ctx, f, f"prompt_files[{i}]") for i, f in enumerate(raw_files)]
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
    key_env = c.string(top.get("api_key_env", "GEMINI_API_KEY" if gemini else "NANOBANANA_API_KEY"), "api_key_env")
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


@dataclass
class _Context:
    """What every prompt inherits, and where warnings collect."""

    c: Checker
    base: Path
    inputs: Inputs
    images: tuple[str, ...]
    params: dict[str, Any]
    model: str | None
    configs: tuple[ImageConfig, ...]
    repeats: int
    api_format: str = "nanobanana"
    warnings: list[str] = field(default_factory=list)


def _prompt_entry(ctx: _Context, p: Any, key: str, link: Link | None = None) -> PromptEntry:
    c = ctx.c
    if isinstance(p, str):
        text = c.string(p, key)
        if ctx.model is None:
            raise c.fail("model", f"required: {key} names no model of its own")
        c.check_support(ctx.model, ctx.configs, "image_configs")
        _check_request(ctx, ctx.model, text, (), key)
        return PromptEntry(
            _derived_id(text), ctx.model, ctx.configs, ctx.repeats, text=text, params=checks.sorted_params(ctx.params)
        )
    if isinstance(p, dict) and len(p) == 1 and not set(p) & (PROMPT_KEYS | TEMPLATE_KEYS):
        ((k, v),) = p.items()
        raise c.fail(
            key,
            f"YAML read this prompt as a mapping ({k!r}: {v!r}) because of the ': ' in it; put the whole prompt in quotes",
        )
    is_template = isinstance(p, dict) and "template" in p
    m = c.mapping(p, key, TEMPLATE_KEYS if is_template else PROMPT_KEYS)
    own_model = c.model(m["model"], f"{key}.model") if "model" in m else ctx.model
    if own_model is None:
        raise c.fail(f"{key}.model", "no model: set `model` at the top of the spec or on this prompt")
    if "image_configs" in m:
        own_configs = c.configs(m["image_configs"], f"{key}.image_configs")
        c.check_support(own_model, own_configs, f"{key}.image_configs")
    else:
        own_configs = ctx.configs
        c.check_support(own_model, own_configs, "image_configs", inherited_by=key)
    own_repeats = c.integer(m.get("repeats", ctx.repeats), f"{key}.repeats", 1, 10_000)
    all_images = checks.refs(c, m.get("images"), f"{key}.images")
    # The parent's image (`@ID`) is not a file to check: it is made during the run.
    own_images = tuple(ref for i, ref in enumerate(all_images) if link is None or i != link.slot)
    params = checks.params(c, m.get("params"), f"{key}.params", ctx.params, own_repeats)
    pid = str(m["id"]).strip() if m.get("id") not in (None, "") else None
    inherited = link.inherited if link is not None else frozenset()
    if is_template:
        used = frozenset(n for ref in own_images for n in _placeholders(c, ref, f"{key}.images"))
        tpl = parse_template(c.file, key, m, ctx.base, used | inherited, inherited)
        missing = used - set(tpl.names)
        if missing:
            name = sorted(missing)[0]
            why = (
                "the parent's labels fill prompts, not image paths" if name in inherited else "has no variable in vars"
            )
            raise c.fail(f"{key}.images", f"placeholder {{{name}}} {why}")
        if tpl.sample and tpl.sample > tpl.full_count:
            ctx.warnings.append(
                f"{key}: sample {tpl.sample} is more than the {tpl.full_count} combinations: every one is used"
            )
        _check_template_images(ctx, own_model, tpl, own_images, key, chained=link is not None)
        entry_id = pid or f"t_{tpl.digest[:8]}"
        return PromptEntry(
            entry_id, own_model, own_configs, own_repeats, template=tpl, images=all_images, params=params, link=link
        )
    if "prompt" not in m:
        raise c.fail(f"{key}.prompt", "required key is missing")
    text = c.string(m["prompt"], f"{key}.prompt")
    for i, ref in enumerate(all_images):
        if link is None or i != link.slot:
            _resolve(c, ctx.inputs, ref, f"{key}.images[{i}]")
    _check_request(ctx, own_model, text, own_images, key, chained=link is not None)
    labels = checks.labels(c, m.get("vars"), f"{key}.vars")
    return PromptEntry(
        pid or _derived_id(text), own_model, own_configs, own_repeats, text=text, images=all_images, params=params,
        labels=labels, link=link,
    )  # fmt: skip


def _check_template_images(
    ctx: _Context, model: str, tpl: Template, refs: tuple[str, ...], key: str, chained: bool = False
) -> None:
    """Resolve every path the template's images can take (only the vars they use are combined)."""
    used = sorted({n for ref in refs for n in placeholders(ref)})
    if not refs:
        _check_request(ctx, model, tpl.longest, (), key, chained=chained)
        return
    columns_ = [tpl.values[tpl.names.index(n)] for n in used]
    combos = zip(*columns_, strict=True) if tpl.combine == "zip" and used else itertools.product(*columns_)
    for combo in combos:
        values = dict(zip(used, combo, strict=True))
        images: list[Any] = []
        for i, ref in enumerate(refs):
            images += _resolve(ctx.c, ctx.inputs, ref.format(**values), f"{key}.images[{i}]")
        _check_request(ctx, model, tpl.longest, tuple(images), key, resolved=True, chained=chained)


def _check_request(
    ctx: _Context,
    model: str,
    text: str | int,
    refs: tuple[Any, ...],
    key: str,
    resolved: bool = False,
    chained: bool = False,
) -> None:
    images = [img for ref in ctx.images for img in ctx.inputs.resolve(ref)]
    images += list(refs) if resolved else [img for ref in refs for img in ctx.inputs.resolve(ref)]
    _check_inline_only(ctx, images, f"{key}.images")
    if chained:  # the parent's image, made during the run: counted, its size not yet known
        images.append(InputImage("@parent", sha256="", mime="image/png"))
    problem = check_request(model, text, tuple(images))
    if problem is not None:
        raise ctx.c.fail(f"{key}.images" if refs else key, problem)


def _check_inline_only(ctx: _Context, images: list[Any], key: str) -> None:
    """Google's own API takes reference images inline (or uploaded), not as http(s) URLs to fetch."""
    url = next((img.url for img in images if img.url is not None), None)
    if ctx.api_format == "gemini" and url is not None:
        raise ctx.c.fail(
            key, f"{url}: api_format gemini sends reference images from files; download it and name the file"
        )


def _resolve(c: Checker, inputs: Inputs, ref: str, key: str) -> tuple[Any, ...]:
    try:
        return inputs.resolve(ref)
    except InputError as e:
        raise c.fail(key, str(e)) from None


def _placeholders(c: Checker, ref: str, key: str) -> list[str]:
    try:
        return placeholders(ref)
    except ValueError as e:
        raise c.fail(key, str(e)) from None


def _prompt_file(ctx: _Context, f: Any, key: str) -> PromptFile:
    c = ctx.c
    path = ctx.base / c.string(f, key)
    kind = file_kind(path, c.file, key)
    count = 0
    beside_spec: list[str] = []  # image paths found only relative to the spec's folder
    try:
        cols = columns(path, kind)
        if cols is not None and "prompt" not in cols:
            raise c.fail(key, f"{path}: no 'prompt' column (columns: {', '.join(sorted(cols)) or 'none'})")
        # One streaming pass, so a bad line is a spec error now and not a crash mid-run.
        for count, prompt in enumerate(iter_prompts(path, kind), 1):  # noqa: B007
            assert ctx.model is not None  # checked before the files
            if ctx.images or prompt.images or len(prompt.text) > 1 << 20:  # a plain line cannot break the limits
                images = tuple(img for ref in ctx.images for img in ctx.inputs.resolve(ref))
                for ref in prompt.images:  # relative to the prompt file (spec's folder: the old reading)
                    found, fallback = ctx.inputs.resolve_in_file(ref, path.parent)
                    images += found
                    if fallback and len(beside_spec) < 3 and ref not in beside_spec:
                        beside_spec.append(ref)
                if ctx.api_format == "gemini" and any(img.url for img in images):
                    raise ValueError(
                        f"prompt {prompt.prompt_id!r}: api_format gemini sends reference images from files, not URLs"
                    )
                problem = check_request(ctx.model, prompt.text, images)
                if problem is not None:
                    raise ValueError(f"prompt {prompt.prompt_id!r}: {problem}")
    except (ValueError, OSError) as e:  # InputError is a ValueError
        raise c.fail(key, f"{path}: {e}") from None
    if beside_spec:
        ctx.warnings.append(
            f"{key}: image paths in {path.name} are read relative to it ({path.parent}), but "
            f"{', '.join(beside_spec)} exist only relative to the spec's folder: read from there for now; "
            f"write them relative to {path.name}"
        )
    return PromptFile(path, kind, count)


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


def _derived_id(text: str) -> str:
    return "p_" + hashlib.sha256(text.encode()).hexdigest()[:8]


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
