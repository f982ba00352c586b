"""`epd serve --colocated 2` as a user runs it: a private Redis, two colocated nodes and the router;
the `openai` client gets transformers' greedy tokens, both nodes serve, /metrics shows the pool,
and `--ttft-target-ms` goes through to the router."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai_support import IDS, assert_matches, data_uri, image_part, reference, serve_media, start_until_line

from router.metrics import parse_exposition

MODEL = "tiny-colocated"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", path, "--colocated", "2", "--port", "0",
           "--device", "cpu", "--log-dir", str(tmp_path_factory.mktemp("logs")), "--served-model-name", MODEL,
           "--ttft-target-ms", "60000"]
    proc, log, line = start_until_line(cmd, "EPD ready on ", 240, "epd serve")
    assert "2 colocated" in line and "1E" not in line, line
    yield line.split()[3], path
    proc.terminate()
    proc.wait(30)


def test_two_colocated_nodes_serve_transformers_greedy_output(served, tmp_path_factory):
    url, path = served
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    with serve_media(tmp_path_factory.mktemp("media")) as media:
        contents = [[image_part(media.url("a.png")), {"type": "text", "text": f"Describe it ({i})."}]
                    for i in range(3)]
        contents.append([image_part(data_uri(media.images["b.png"])), {"type": "text", "text": "And this?"}])
        contents += [[{"type": "text", "text": f"Write line {i} of a poem about the sea."}] for i in range(4)]

        def ask(content):
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                  max_tokens=8, temperature=0, **IDS)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, contents))
        for content, answer in zip(contents, answers, strict=True):
            images = [media.images["a.png" if part["image_url"]["url"].endswith("a.png") else "b.png"]
                      for part in content if part["type"] == "image_url"]
            prompt_ids, expected = reference(path, content, images, 8)
            assert_matches(answer, prompt_ids, expected, max_tokens=8)
    metrics = parse_exposition(httpx.get(url.removesuffix("/v1") + "/metrics").text)
    assert metrics[("epd:pool_size", (("model_name", MODEL), ("pool", "colocated")))] == 2
    assert metrics[("epd:pool_size", (("model_name", MODEL), ("pool", "prefill")))] == 0
    colocated = (("model_name", MODEL), ("pool", "colocated"))
    assert metrics[("epd:node_kv_pages_total", colocated)] > 0
    assert metrics[("epd:node_unresponsive", colocated)] == 0
