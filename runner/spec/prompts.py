"""One prompt, template or prompt file of a spec: checked against what it inherits from the top."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checks
from .chains import Link
from .checks import Checker
from .inputs import InputError, InputImage, Inputs, check_request
from .sources import columns, file_kind, iter_prompts
from .templates import Template, parse_template, placeholders
from .values import ImageConfig, Params

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


@dataclass
class Context:
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


def prompt_entry(ctx: Context, p: Any, key: str, link: Link | None = None) -> PromptEntry:
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
            resolve(c, ctx.inputs, ref, f"{key}.images[{i}]")
    _check_request(ctx, own_model, text, own_images, key, chained=link is not None)
    labels = checks.labels(c, m.get("vars"), f"{key}.vars")
    return PromptEntry(
        pid or _derived_id(text), own_model, own_configs, own_repeats, text=text, images=all_images, params=params,
        labels=labels, link=link,
    )  # fmt: skip


def _check_template_images(
    ctx: Context, model: str, tpl: Template, refs: tuple[str, ...], key: str, chained: bool = False
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
            images += resolve(ctx.c, ctx.inputs, ref.format(**values), f"{key}.images[{i}]")
        _check_request(ctx, model, tpl.longest, tuple(images), key, resolved=True, chained=chained)


def _check_request(
    ctx: Context,
    model: str,
    text: str | int,
    refs: tuple[Any, ...],
    key: str,
    resolved: bool = False,
    chained: bool = False,
) -> None:
    images = [img for ref in ctx.images for img in ctx.inputs.resolve(ref)]
    images += list(refs) if resolved else [img for ref in refs for img in ctx.inputs.resolve(ref)]
    check_inline_only(ctx, images, f"{key}.images")
    if chained:  # the parent's image, made during the run: counted, its size not yet known
        images.append(InputImage("@parent", sha256="", mime="image/png"))
    problem = check_request(model, text, tuple(images))
    if problem is not None:
        raise ctx.c.fail(f"{key}.images" if refs else key, problem)


def check_inline_only(ctx: Context, images: list[Any], key: str) -> None:
    """Google's own API takes reference images inline (or uploaded), not as http(s) URLs to fetch."""
    url = next((img.url for img in images if img.url is not None), None)
    if ctx.api_format == "gemini" and url is not None:
        raise ctx.c.fail(
            key, f"{url}: api_format gemini sends reference images from files; download it and name the file"
        )


def resolve(c: Checker, inputs: Inputs, ref: str, key: str) -> tuple[Any, ...]:
    try:
        return inputs.resolve(ref)
    except InputError as e:
        raise c.fail(key, str(e)) from None


def _placeholders(c: Checker, ref: str, key: str) -> list[str]:
    try:
        return placeholders(ref)
    except ValueError as e:
        raise c.fail(key, str(e)) from None


def prompt_file(ctx: Context, f: Any, key: str) -> PromptFile:
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


def _derived_id(text: str) -> str:
    return "p_" + hashlib.sha256(text.encode()).hexdigest()[:8]
