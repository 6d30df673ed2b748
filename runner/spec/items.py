"""Expand a job spec, lazily, into items: one request each, with a stable id."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring as _quote
from typing import Any, NamedTuple

from ..errors import SpecError, UsageError
from .chains import joins, merged
from .inputs import InputError, InputImage
from .parse import JobSpec
from .sources import iter_prompts
from .values import ImageConfig, Params


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    prompt_id: str
    prompt: str
    model: str
    config: ImageConfig
    repeat: int
    vars: dict[str, str] | None = None
    inputs: tuple[InputImage, ...] = ()  # reference images, sent in this order after the text
    params: Params = ()  # as the spec gives them; see sent_params

    def sent_params(self) -> dict[str, Any]:
        """The request parameters as sent: an integer seed moves with the repeat, so repeats differ."""
        params = dict(self.params)
        if isinstance(params.get("seed"), int):
            params["seed"] += self.repeat
        return params

    def record_fields(self) -> dict[str, Any]:
        """The item's part of its manifest line: what was asked, as it was sent."""
        fields: dict[str, Any] = {
            "item_id": self.item_id,
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "model": self.model,
            "image_config": {"aspect_ratio": self.config.aspect_ratio, "image_size": self.config.image_size},
            "repeat": self.repeat,
            "vars": self.vars,
        }
        if self.inputs:
            fields["inputs"] = [_input_record(i) for i in self.inputs]
        if self.params:
            fields["params"] = self.sent_params()
        return fields


def _input_record(image: InputImage) -> dict[str, Any]:
    if image.url is not None:
        return {"url": image.url}
    if image.parent is not None:  # an edit chain: the parent item's own image
        return {"item_id": image.parent, "path": image.image_path, "sha256": image.sha256, "mime": image.mime,
                "bytes": image.size, "stored": image.image_path}  # fmt: skip
    return {"path": image.ref, "sha256": image.sha256, "mime": image.mime, "bytes": image.size, "stored": image.stored}


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'K/N' with 0 <= K < N: this machine runs the items whose id falls in slice K."""
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise UsageError(f"--shard: expected K/N such as 0/4, got {text!r}") from None
        if n < 1 or not 0 <= k < n:
            raise UsageError(f"--shard: need 0 <= K < N, got {text!r}")
        return cls(k, n)

    def owns(self, key: int) -> bool:
        """Is the item with this id (as an integer) in this shard?"""
        return key % self.count == self.index

    def share(self, requests_per_minute: float) -> float:
        """Each of N shards takes 1/N of the key's request rate."""
        return requests_per_minute / self.count

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


def item_id(
    model: str, prompt: str, config: ImageConfig, repeat: int, inputs: tuple[InputImage, ...] = (), params: Params = ()
) -> str:
    """Hash of exactly what is requested: the same request always gets the same id.

    The hashed text is json.dumps([model, prompt, aspect_ratio, image_size, repeat],
    ensure_ascii=False), built from the C string encoder: json.dumps itself was half the
    cost of expanding a million items. Reference images (a file by the sha256 of its bytes,
    a URL by its text) and params extend the list only when there are any, so a prompt
    without them keeps the id it had before they existed."""
    size = _quote(config.image_size) if config.image_size is not None else "null"
    ratio = _quote(config.aspect_ratio) if config.aspect_ratio is not None else "null"
    key = f"[{_quote(model)}, {_quote(prompt)}, {ratio}, {size}, {repeat}"
    if inputs or params:
        key += ", " + json.dumps([i.key for i in inputs]) + ", " + json.dumps([list(p) for p in params])
    return hashlib.sha256((key + "]").encode("utf-8", "surrogatepass")).hexdigest()[:20]


def iter_items(spec: JobSpec, shard: Shard | None = None) -> Iterator[Item]:
    """Every item of the spec, in spec order, each identical request once."""
    for _, fields in _expand(spec, shard):
        yield Item(*fields)


class ItemFields(NamedTuple):
    """An Item's fields, in its order (Item(*fields) builds it): planning reads them without the Item."""

    item_id: str
    prompt_id: str
    prompt: str
    model: str
    config: ImageConfig
    repeat: int
    vars: dict[str, str] | None
    inputs: tuple[InputImage, ...]
    params: Params


def iter_keyed(spec: JobSpec, shard: Shard | None = None) -> Iterator[tuple[int, ItemFields]]:
    """(id as an integer, the Item's fields) of iter_items, without building the items: for planning."""
    return _expand(spec, shard)


def _expand(spec: JobSpec, shard: Shard | None) -> Iterator[tuple[int, ItemFields]]:
    seen: set[int] = set()  # ints, not strings: a million ids stay in tens of MB
    for pid, text, model, configs, repeats, vars_, inputs, params in _iter_prompts(spec):
        for config in configs:
            for r in range(repeats):
                iid = item_id(model, text, config, r, inputs, params)
                key = int(iid, 16)
                if key in seen:
                    continue
                seen.add(key)
                if shard is None or shard.owns(key):
                    yield key, ItemFields(iid, pid, text, model, config, r, vars_, inputs, params)


_Prompt = tuple[str, str, str, tuple[ImageConfig, ...], int, dict[str, str] | None, tuple[InputImage, ...], Params]


def _iter_prompts(spec: JobSpec) -> Iterator[_Prompt]:
    try:
        yield from _iter_inline(spec)
    except InputError as e:  # a reference image changed or went away since the spec was checked
        raise SpecError(str(spec.spec_path), "images", str(e)) from None
    yield from _iter_files(spec)


def _top_images(spec: JobSpec) -> tuple[InputImage, ...]:
    return tuple(img for ref in spec.images for img in spec.inputs.resolve(ref))


def _iter_inline(spec: JobSpec) -> Iterator[_Prompt]:
    resolve = spec.inputs.resolve
    top = _top_images(spec)
    for p in spec.prompts:
        if p.link is not None:  # a chained prompt: its items come from its parent's images (iter_children)
            continue
        if p.template is not None:
            fixed = not any("{" in ref for ref in p.images)
            own = tuple(img for ref in p.images for img in resolve(ref)) if fixed else ()
            for text, vars_ in p.template.expand():
                if not fixed:
                    own = tuple(img for ref in p.images for img in resolve(ref.format(**vars_)))
                yield p.prompt_id, text, p.model, p.image_configs, p.repeats, vars_, top + own, p.params
        else:
            assert p.text is not None
            own = tuple(img for ref in p.images for img in resolve(ref))
            yield p.prompt_id, p.text, p.model, p.image_configs, p.repeats, dict(p.labels) or None, top + own, p.params


def _iter_files(spec: JobSpec) -> Iterator[_Prompt]:
    resolve_in_file = spec.inputs.resolve_in_file
    for i, f in enumerate(spec.prompt_files):
        assert spec.model is not None  # the spec checker requires it with prompt_files
        try:
            top = _top_images(spec)
            for fp in iter_prompts(f.path, f.kind):  # image paths relative to the prompt file (see resolve_in_file)
                own = tuple(img for ref in fp.images for img in resolve_in_file(ref, f.path.parent)[0])
                yield (
                    fp.prompt_id,
                    fp.text,
                    spec.model,
                    spec.image_configs,
                    spec.repeats,
                    fp.labels,
                    top + own,
                    spec.params,
                )
        except (OSError, ValueError) as e:  # the file changed since the spec was checked (InputError included)
            raise SpecError(str(spec.spec_path), f"prompt_files[{i}]", f"{f.path}: {e}") from None


def parent_image(item_id: str, image_path: str, sha256: str, mime: str, size: int) -> InputImage:
    """An item's image as a reference image of its chained children."""
    return InputImage(f"@{item_id}", sha256=sha256, mime=mime, size=size, parent=item_id, image_path=image_path)


def iter_children(spec: JobSpec, parent: Item, image: InputImage) -> Iterator[ItemFields]:
    """The items of the prompts chained to `parent`'s prompt, fed `image` (its image): each child
    prompt's combinations whose labels agree with the parent's, every config, every repeat."""
    resolve = spec.inputs.resolve
    try:
        top = _top_images(spec)
        for p in spec.children_of(parent.prompt_id):
            assert p.link is not None
            if p.template is not None:
                combos: Iterator[tuple[str, dict[str, str] | None]] = p.template.expand(parent.vars)
            else:
                assert p.text is not None
                combos = iter([(p.text, dict(p.labels) or None)])
            for text, own in combos:
                if not joins(own or {}, parent.vars):
                    continue
                inputs: list[InputImage] = []
                for slot, ref in enumerate(p.images):
                    if slot == p.link.slot:
                        inputs.append(image)
                    else:
                        inputs += resolve(ref.format(**own) if own and "{" in ref else ref)
                labels = merged(parent.vars, own)
                refs = top + tuple(inputs)
                for config in p.image_configs:
                    for r in range(p.repeats):
                        iid = item_id(p.model, text, config, r, refs, p.params)
                        yield ItemFields(iid, p.prompt_id, text, p.model, config, r, labels, refs, p.params)
    except InputError as e:  # a reference image changed or went away since the spec was checked
        raise SpecError(str(spec.spec_path), "images", str(e)) from None


Memo = dict[tuple[str, tuple[tuple[str, str], ...]], Counter[tuple[str, str, str | None]]]


def expected_children(
    spec: JobSpec, prompt_id: str, vars_: dict[str, str] | None, memo: Memo
) -> Counter[tuple[str, str, str | None]]:
    """How many descendants an ok item of `prompt_id` with labels `vars_` gets, assuming every
    parent succeeds: (their prompt_id, model, image_size sent) -> count. Their ids cannot be known
    before their parents' images are; counts and prices can. `memo` (one per pass) remembers the
    answer per (prompt, labels): parents alike have alike descendants."""
    labels = tuple(sorted((vars_ or {}).items()))
    found = memo.get((prompt_id, labels))
    if found is not None:
        return found
    parent = dict(labels)
    counts: Counter[tuple[str, str, str | None]] = Counter()
    for p in spec.children_of(prompt_id):
        if p.template is not None:
            combos: Iterator[dict[str, str] | None] = (own for _, own in p.template.expand(parent))
        else:
            combos = iter([dict(p.labels) or None])
        for own in combos:
            if not joins(own or {}, parent):
                continue
            below = expected_children(spec, p.prompt_id, merged(parent, own), memo)
            for config in p.image_configs:
                counts[(p.prompt_id, p.model, config.image_size)] += p.repeats
                for key, n in below.items():
                    counts[key] += p.repeats * n
    memo[(prompt_id, labels)] = counts
    return counts
