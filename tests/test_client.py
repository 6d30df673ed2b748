"""Parsing answers: the fast path for big images and the plain path agree, and garbage is a Failure."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner.engine.job import RunOptions, run_job_async
from runner.gateway.answer import Success, _cut_images, parse_completion
from runner.mock import render_image
from runner.policy import Failure
from runner.spec import load_spec


def answer(content: str, finish: str = "stop", **message: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": finish}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1120, "total_tokens": 1123},
        }
    ).encode()


PNG = render_image(64, 48, seed=b"test", mime="png", pad_bytes=3_000_000)  # big enough for several decode steps
B64 = base64.b64encode(PNG).decode()


def test_a_big_image_is_cut_out_of_the_bytes_and_decoded_exactly() -> None:
    body = answer(f"Here you go\n![image](data:image/png;base64,{B64})")
    assert _cut_images(bytearray(body)) is not None  # the fast path applies
    out = parse_completion(bytearray(body))
    assert isinstance(out, Success)
    assert [i.data for i in out.images] == [PNG] and out.images[0].mime == "image/png"
    assert out.text == "Here you go" and out.usage == {
        "prompt_tokens": 3,
        "completion_tokens": 1120,
        "total_tokens": 1123,
    }


@pytest.mark.parametrize(
    "body",
    [
        # JSON may escape '/' as '\\/': the cut fails and the plain path decodes it right
        answer(f"![image](data:image/png;base64,{B64})").replace(b"/", b"\\/"),
        # base64 broken over lines inside the JSON string
        answer("![image](data:image/png;base64," + "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)) + ")"),
        # a data URI in the reasoning as well as in the content
        answer(f"![image](data:image/png;base64,{B64})", reasoning_content="sketch: data:image/png;base64,AAAA)"),
    ],
    ids=["escaped-slashes", "line-breaks", "uri-in-reasoning"],
)
def test_unusual_encodings_fall_back_to_the_plain_path(body: bytes) -> None:
    out = parse_completion(body)
    assert isinstance(out, Success) and [i.data for i in out.images] == [PNG]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"<html>oops</html>", "invalid_response"),
        (b'{"choices": []}', "invalid_response"),
        (answer(f"![image](data:image/png;base64,{B64[:-5]})"), "invalid_response"),  # cut-off base64
        (
            answer("![image](data:image/png;base64," + base64.b64encode(b"GIF89a" + b"x" * 64).decode() + ")"),
            "invalid_response",
        ),
        (
            answer("![image](data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode() + ")"),
            "invalid_response",
        ),
        (answer("I cannot draw that", finish="content_filter"), "content_filter"),
        (answer("Here is a description of a cat instead."), "no_image"),
        (answer(""), "no_image"),
    ],
    ids=["html", "no-choices", "cut-base64", "wrong-magic", "half-a-png", "content-filter", "text-only", "empty"],
)
def test_bad_answers_are_failures_of_the_right_kind(body: bytes, kind: str) -> None:
    out = parse_completion(body)
    assert isinstance(out, Failure) and out.kind == kind and out.status == 200


def test_the_png_under_test_is_real() -> None:
    assert PNG.startswith(b"\x89PNG\r\n\x1a\n") and zlib.crc32(PNG) and len(PNG) > 3_000_000


def test_a_whole_run_through_an_injected_transport(tmp_path: Path) -> None:
    """The network seam: run_job_async over httpx.MockTransport, every answer shape and fault class
    of one item at a time, in process (no server)."""
    small = render_image(16, 9, b"small")
    uri = "data:image/png;base64," + base64.b64encode(small).decode()

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = body["messages"][0]["content"]
        if prompt == "markdown":
            return httpx.Response(200, content=answer(f"![image]({uri})"))
        if prompt == "images":
            return httpx.Response(200, content=answer("", images=[{"type": "image_url", "image_url": {"url": uri}}]))
        if prompt == "html":
            return httpx.Response(502, text="<html><body><h1>502 Bad Gateway</h1></body></html>")
        return httpx.Response(200, content=b'{"choices": "nope"}')

    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        "name: t\nmodel: nanobanana\nprompts: [markdown, images, html, broken]\nmax_attempts: 2\n"
        "backoff_base_s: 0.001\nbackoff_max_s: 0.001\n"
    )
    options = RunOptions(api_key="k", progress=False, transport=httpx.MockTransport(handle))
    result = anyio.run(run_job_async, load_spec(spec_path), options, lambda _m: None)
    assert (result.ok, result.failed, result.requests) == (2, 2, 6)
    assert result.failures_by_kind == {"server_error": 1, "invalid_response": 1}
    assert dict(result.stats.retries_by_kind) == {"server_error": 1, "invalid_response": 1}


def _mutations(rng: Any, doc: Any, count: int) -> Any:
    """`doc` with `count` of its values (at any depth) replaced by values of other types."""
    odd = [{}, [], 0, -1, 10**30, 1e308, None, True, "", "STOP", "SAFETY", [{}], {"a": 1}, [None], "\u202e"]
    doc = json.loads(json.dumps(doc))
    for _ in range(count):
        node, key = None, None
        here: Any = doc
        while isinstance(here, (dict, list)) and here and rng.random() < 0.8:
            key = rng.choice(list(here)) if isinstance(here, dict) else rng.randrange(len(here))
            node, here = here, here[key]
        value = json.loads(json.dumps(rng.choice(odd)))  # a copy: never one object in two places
        if node is None:
            return value
        node[key] = value
    return doc


def test_no_answer_google_could_send_makes_the_reader_raise() -> None:
    """A results line or answer of any shape is an Outcome or "not a line", never an exception: in
    batch mode one line that raised stopped the collection of its whole batch, run after run."""
    import random

    from runner.gateway.gemini import read_response, read_results_line

    image = base64.b64encode(render_image(4, 3, b"a gull")).decode()
    answer = {
        "candidates": [{"content": {"parts": [{"text": "here"}, {"inlineData": {"mimeType": "image/png", "data": image}}]},
                        "finishReason": "STOP", "safetyRatings": [{"category": "x", "probability": "LOW"}]}],
        "promptFeedback": {"blockReason": "OTHER"}, "modelVersion": "gemini-3-pro-image-preview",
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290}, "responseId": "r1",
    }  # fmt: skip
    rng = random.Random(7)
    for _ in range(4000):
        mutated = _mutations(rng, {"key": "00ab", "response": answer}, rng.randint(1, 3))
        found = read_results_line(json.dumps(mutated).encode(), "k")
        assert found is None or isinstance(found[1], (Success, Failure))
        if isinstance(mutated, dict):
            assert isinstance(read_response(mutated.get("response"), "k"), (Success, Failure))
    # the shape that raised: finishReason an object, beside a good image
    odd = {**answer, "candidates": [{**answer["candidates"][0], "finishReason": {"reason": "STOP"}}]}
    assert isinstance(read_response(odd, "k"), Success)
