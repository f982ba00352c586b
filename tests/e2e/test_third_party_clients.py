"""Tools written for vLLM, pointed at `epd serve --model PATH` as their users would: `vllm bench
serve` (the model sent as the path, its tokenizer loaded from it), litellm's `hosted_vllm`
provider and langchain-openai's `ChatOpenAI` (chat completions and the Responses API). Each
answer equals the `openai` SDK's greedy answer, which the other e2e tests check against
transformers token for token.

litellm and langchain-openai come with the test extra; vLLM is installed by CI without its
dependencies (`.ci/run`: its bench module and the few packages it imports); without it that test
skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import openai
import pytest
from openai_support import data_uri, image_part, start_until_line
from support import noise_image, png_bytes

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")   # litellm: no fetch of its price list at import


@dataclass
class Served:
    url: str
    model: str        # the checkpoint's path, as given to --model: the name clients send


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    path = tiny_models["qwen2_5_vl"]
    cmd = [sys.executable, "-m", "epd.cli", "serve", "--model", path, "--port", "0", "--device", "cpu",
           "--log-dir", str(tmp_path_factory.mktemp("clients-logs")), "--max-model-len", str(MAX_MODEL_LEN)]
    proc, log, line = start_until_line(cmd, "EPD ready on ", 240, "epd serve")
    yield Served(line.split()[3].removesuffix("/v1"), path)
    proc.terminate()
    proc.wait(60)


MAX_MODEL_LEN = 512
IMAGE = data_uri(png_bytes(noise_image(48, 40, seed=3)))
QUESTION = "What is in this picture?"


def _openai_answer(served: Served, max_tokens: int = 8) -> str:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    resp = client.chat.completions.create(
        model=served.model, max_tokens=max_tokens, temperature=0,
        messages=[{"role": "user", "content": [image_part(IMAGE), {"type": "text", "text": QUESTION}]}])
    assert resp.choices[0].message.content
    return resp.choices[0].message.content


def test_max_model_len_given_to_epd_serve_holds_through_the_pools(served):
    """vLLM's --max-model-len, passed to epd serve, reaches the router and every node: the model card
    says it, and a prompt past it is a 400 naming the limit, as vLLM's."""
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    [card] = client.models.list().data
    assert card.id == served.model and card.max_model_len == MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=served.model, max_tokens=4,
                                       messages=[{"role": "user", "content": "cat " * (MAX_MODEL_LEN + 10)}])
    assert str(MAX_MODEL_LEN) in str(refused.value)
    ok = client.chat.completions.create(model=served.model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert ok.usage.completion_tokens >= 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (CI installs it)")
def test_vllm_bench_serve_runs_against_epd_serve_with_the_model_sent_as_its_path(served, tmp_path):
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat",
           "--base-url", served.url, "--endpoint", "/v1/chat/completions", "--model", served.model,
           "--dataset-name", "random-mm", "--num-prompts", "6", "--random-input-len", "24",
           "--random-output-len", "6", "--ignore-eos", "--random-mm-base-items-per-request", "1",
           "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
           "--random-mm-bucket-config", "{(64, 64, 1): 1.0}", "--save-result", "--result-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [result_file] = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    assert (result["completed"], result["failed"]) == (6, 0), result.get("errors")
    assert result["total_output_tokens"] == 6 * 6       # --ignore-eos: every request its 6 tokens
    assert result["mean_ttft_ms"] > 0


def test_litellm_hosted_vllm_gets_the_same_greedy_answer(served):
    litellm = pytest.importorskip("litellm")
    resp = litellm.completion(
        model=f"hosted_vllm/{served.model}", api_base=f"{served.url}/v1", api_key="none", max_tokens=8,
        temperature=0, messages=[{"role": "user", "content": [image_part(IMAGE), {"type": "text", "text": QUESTION}]}])
    assert resp.choices[0].message.content == _openai_answer(served)
    assert resp.usage.completion_tokens == 8 or resp.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat-completions", "responses-api"])
def test_langchain_chat_openai_gets_the_same_greedy_answer(served, responses_api):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = langchain_openai.ChatOpenAI(model=served.model, base_url=f"{served.url}/v1", api_key="none",
                                      temperature=0, max_tokens=8, max_retries=0, use_responses_api=responses_api)
    messages = [HumanMessage(content=[{"type": "image_url", "image_url": {"url": IMAGE}},
                                      {"type": "text", "text": QUESTION}])]
    expected = _openai_answer(served)
    assert llm.invoke(messages).text == expected
    assert "".join(chunk.text for chunk in llm.stream(messages)) == expected
    with_system = [SystemMessage(content="Answer briefly."), *messages]
    assert llm.invoke(with_system).text      # a system message passes too (as instructions or a system turn)
