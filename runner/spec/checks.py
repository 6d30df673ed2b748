"""Checks of single spec values, each naming the file, the key path and the problem."""

from __future__ import annotations

import difflib
import math
from typing import Any
from urllib.parse import urlsplit

from ..errors import SpecError
from ..models import MODELS
from .values import ImageConfig, Params

CONFIG_KEYS = {"aspect_ratio", "image_size"}


def describe(value: Any) -> str:
    """What YAML made of a value, with the usual cause when it was not meant."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads yes/no/on/off/true/false unquoted as true/false: put it in quotes)"
    if isinstance(value, (int, float)):
        return f"the number {value!r} (put it in quotes if it is text)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else repr(value)


def check_url(url: str) -> str | None:
    """Why an http(s) base URL is unusable, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a usable URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http(s) URL such as https://host/v1, got {url!r}"
    if parts.username is not None or parts.password is not None:
        return "the URL holds a user name or password; they would be sent and logged: put the key in api_key_env"
    if parts.query or parts.fragment or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "the URL must not hold a query, a fragment, spaces or control characters"
    del port
    return None


class Checker:
    """Reads values out of the YAML tree, naming file and key path in every error."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(self.file, key, problem)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {describe(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(sorted(allowed))})"
                raise self.fail(f"{key}.{k}" if key else str(k), f"unknown key{hint}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {describe(value)}")
        return value.strip()

    def integer(self, value: Any, key: str, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {describe(value)}")
        if value < lo or (hi is not None and value > hi):
            raise self.fail(key, f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
        return value

    def number(self, value: Any, key: str, lo: float, *, strict: bool = False, hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {describe(value)}")
        if not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value}")
        if value < lo or (strict and value == lo):
            raise self.fail(key, f"must be {'greater than' if strict else 'at least'} {lo:g}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be at most {hi:g}")
        return float(value)

    def model(self, value: Any, key: str) -> str:
        name = self.string(value, key)
        if name not in MODELS:
            raise self.fail(key, f"unknown model {name!r} (known: {', '.join(MODELS)})")
        return name

    def configs(self, value: Any, key: str) -> tuple[ImageConfig, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(
                key, "expected a non-empty list of {aspect_ratio, image_size} mappings (either may be left out)"
            )
        out = []
        for i, raw in enumerate(value):
            k = f"{key}[{i}]"
            m = self.mapping(raw, k, CONFIG_KEYS)
            ratio = m.get("aspect_ratio")
            if isinstance(ratio, int) and not isinstance(ratio, bool):
                raise self.fail(
                    f"{k}.aspect_ratio", 'write ratios in quotes, e.g. "16:9" (YAML reads 16:9 as a number)'
                )
            # left out: none is sent, and an edit keeps its input image's shape
            ratio = self.string(ratio, f"{k}.aspect_ratio") if "aspect_ratio" in m else None
            size = m.get("image_size")
            if isinstance(size, int) and not isinstance(size, bool):
                size = str(size)
            if size is not None:
                size = self.string(size, f"{k}.image_size")
            out.append(ImageConfig(ratio, size))
        return tuple(out)

    def check_support(
        self, model: str, configs: tuple[ImageConfig, ...], key: str, inherited_by: str | None = None
    ) -> None:
        """Does `model` take every config? `inherited_by` names a prompt using the top-level configs."""
        info = MODELS[model]
        for i, c in enumerate(configs):
            problem = None
            field = "aspect_ratio"
            if c.aspect_ratio is not None and c.aspect_ratio not in info.aspect_ratios:
                problem = f"{model} does not support aspect ratio {c.aspect_ratio!r} (supported: {' '.join(info.aspect_ratios)})"
            elif c.image_size is not None and not info.sizes:
                problem, field = f"{model} takes no image_size (it always makes ~1K images)", "image_size"
            elif c.image_size is not None and c.image_size not in info.sizes:
                hint = " (sizes are uppercase)" if c.image_size.upper() in info.sizes else ""
                problem = (
                    f"{model} does not support image_size {c.image_size!r}{hint} (supported: {' '.join(info.sizes)})"
                )
                field = "image_size"
            if problem is None:
                continue
            if inherited_by is not None:
                raise self.fail(
                    f"{inherited_by}.model",
                    f"{problem}, but this prompt inherits the top-level {key}[{i}]; give it image_configs of its own",
                )
            raise self.fail(f"{key}[{i}].{field}", problem)


def refs(c: Checker, raw: Any, key: str) -> tuple[str, ...]:
    return tuple(c.string(r, f"{key}[{i}]") for i, r in enumerate(as_list(c, raw, key)))


def as_list(c: Checker, raw: Any, key: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise c.fail(key, f"expected a list, got {describe(raw)}")
    return raw


def params(c: Checker, raw: Any, key: str, inherited: dict[str, Any], repeats: int) -> tuple[tuple[str, Any], ...]:
    """seed, temperature, top_p: checked; merged over what the prompt inherits."""
    out = dict(inherited)
    if raw is not None:
        m = c.mapping(raw, key, {"seed", "temperature", "top_p"})
        if "seed" in m:
            out["seed"] = c.integer(m["seed"], f"{key}.seed", -(2**31), 2**31 - 1)
        if "temperature" in m:
            out["temperature"] = c.number(m["temperature"], f"{key}.temperature", 0, hi=2)
        if "top_p" in m:
            out["top_p"] = c.number(m["top_p"], f"{key}.top_p", 0, hi=1)
    seed = out.get("seed")
    if seed is not None and (seed <= 0 <= seed + repeats - 1 or seed + repeats - 1 > 2**31 - 1):
        raise c.fail(f"{key}.seed", f"seed + repeat ({seed}..{seed + repeats - 1}) must stay a non-zero 32-bit integer")
    return sorted_params(out)


def sorted_params(params: dict[str, Any]) -> Params:
    return tuple(sorted(params.items()))


def labels(c: Checker, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise c.fail(key, f"expected a mapping of labels such as {{animal: fox}}, got {describe(raw)}")
    out = []
    for name, value in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise c.fail(key, f"label names must be strings, got {describe(name)}")
        if isinstance(value, (dict, list)) or value is None:
            raise c.fail(f"{key}.{name}", f"expected a plain value, got {describe(value)}")
        out.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
    return tuple(out)


def pricing(c: Checker, raw: Any) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
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
            if size not in (*sizes, "input_image"):
                known = " ".join(sizes)
                raise c.fail(
                    f"pricing.{model}.{size}", f"{model} has no size {size!r} (sizes: {known}; or input_image)"
                )
            table.append((size, c.number(price, f"pricing.{model}.{size}", 0)))
        out.append((model, tuple(table)))
    return tuple(out)


def model_ids(c: Checker, raw: Any) -> tuple[tuple[str, str], ...]:
    """`model_ids: {nanobanana_pro: gemini-3-pro-image-preview}`: the Gemini API's name for a model."""
    if raw is None:
        return ()
    m = c.mapping(raw, "model_ids", set(MODELS))
    out = []
    for model, name in m.items():
        name = c.string(name, f"model_ids.{model}").removeprefix("models/")
        if not all(ch.isalnum() or ch in "-._" for ch in name):
            raise c.fail(f"model_ids.{model}", f"{name!r} is not a model id (letters, digits, '-', '.', '_')")
        out.append((model, name))
    return tuple(out)
