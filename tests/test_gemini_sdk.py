"""Google's own SDK (google-genai, a test dependency only) against the mock: the proof that the mock speaks Google's API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import StartGateway, png

genai = pytest.importorskip("google.genai", reason="google-genai is a test dependency")


def test_the_sdk_uploads_creates_gets_lists_downloads_and_generates(tmp_path: Path, gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", batch_latency_s=0.2, api_key="sdk-key")
    client = genai.Client(api_key="sdk-key", http_options={"base_url": gw.root_url + "/", "api_version": "v1beta"})
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"key": f"k{i}", "request": {"contents": [{"role": "user", "parts": [{"text": f"a stork {i}"}]}],
                                     "generationConfig": {"responseModalities": ["TEXT", "IMAGE"],
                                                          "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"}}}}
        for i in range(3)
    ]  # fmt: skip
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.upload(file=str(requests), config={"mime_type": "application/jsonl", "display_name": "in"})
    assert uploaded.name and uploaded.name.startswith("files/") and uploaded.size_bytes == requests.stat().st_size
    assert client.files.get(name=uploaded.name).display_name == "in"

    job = client.batches.create(
        model="gemini-3-pro-image-preview", src=uploaded.name, config={"display_name": "runner-sdk"}
    )
    assert job.name and job.display_name == "runner-sdk" and job.state is not None
    assert job.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert [b.name for b in client.batches.list() if b.display_name == "runner-sdk"] == [job.name]
    deadline = time.monotonic() + 30
    while (job := client.batches.get(name=job.name)).state is not None and job.state.name != "JOB_STATE_SUCCEEDED":
        assert time.monotonic() < deadline, job.state
        time.sleep(0.05)  # the SDK has no way to wait for an event: it polls, as its users do
    assert job.dest is not None and job.dest.file_name
    data = client.files.download(file=job.dest.file_name)
    got = [json.loads(line) for line in data.splitlines()]
    assert sorted(g["key"] for g in got) == ["k0", "k1", "k2"]
    for line in got:
        parts = line["response"]["candidates"][0]["content"]["parts"]
        images = [p for p in parts if "inlineData" in p and not p.get("thought")]
        assert len(images) == 1 and images[0]["inlineData"]["mimeType"] == "image/png"
    client.files.delete(name=uploaded.name)
    assert gw.stats()["google"]["deleted_files"] == 1

    answer = client.models.generate_content(
        model="gemini-2.5-flash-image",
        contents=[genai.types.Part.from_bytes(data=png(), mime_type="image/png"), "the same cup, blue"],
        config=genai.types.GenerateContentConfig(
            response_modalities=["TEXT", "IMAGE"], image_config=genai.types.ImageConfig(aspect_ratio="4:3")
        ),
    )
    assert answer.candidates and answer.candidates[0].content and answer.candidates[0].content.parts
    inline = [p.inline_data for p in answer.candidates[0].content.parts if p.inline_data]
    assert len(inline) == 1 and inline[0].data and inline[0].data.startswith(b"\x89PNG")
    assert gw.stats()["requests_log"][-1]["image_config"] == {"aspectRatio": "4:3"}


def test_the_sdk_is_refused_with_a_wrong_key(gateway: StartGateway) -> None:
    gw = gateway(flavor="gemini", api_key="right")
    client = genai.Client(api_key="wrong", http_options={"base_url": gw.root_url + "/", "api_version": "v1beta"})
    with pytest.raises(genai.errors.ClientError) as err:
        client.models.generate_content(model="gemini-2.5-flash-image", contents="a cup")
    assert err.value.code == 400 and "API key not valid" in str(err.value)
