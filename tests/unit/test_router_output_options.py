"""vLLM's output options the router applies: include_stop_str_in_output, echo (text completions)
and stream_options.continuous_usage_stats, against a scripted backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from test_router_app import HELLO, ScriptedBackend, assert_error, prompts, sse_events  # noqa: F401

from router.app import create_app
from router.backend import BackendEvent, BackendRequest
from router.settings import RouterSettings


class StoppingBackend(ScriptedBackend):
    """Says "Hel", "lo" and ends on the stop string "END" (which the backend cuts from the text)."""

    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        self.requests.append(req)
        for i, text in enumerate(["Hel", "lo"]):
            last = i == 1
            yield BackendEvent(token_id=10 + i, text=text, finished=last, finish_reason="stop" if last else None,
                               matched_stop="END" if last else None, prompt_tokens=len(req.input_ids or []),
                               completion_tokens=i + 1)


@pytest.fixture
def client(prompts):  # noqa: F811
    cfg = RouterSettings(model_path=prompts.config.model_path, served_model_name="tiny")
    return TestClient(create_app(StoppingBackend(), cfg, prompts))


def test_include_stop_str_in_output(client):
    plain = client.post("/v1/chat/completions", json={"messages": HELLO, "stop": "END"}).json()
    assert plain["choices"][0]["message"]["content"] == "Hello"
    body = client.post("/v1/chat/completions", json={"messages": HELLO, "stop": "END",
                                                     "include_stop_str_in_output": True}).json()
    assert body["choices"][0]["message"]["content"] == "HelloEND"
    events = sse_events(client.post("/v1/completions", json={"prompt": "hi", "stop": "END", "stream": True,
                                                             "include_stop_str_in_output": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "HelloEND"


def test_echo_puts_the_prompt_before_the_answer(client):
    body = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 2, "echo": True}).json()
    assert body["choices"][0]["text"] == "Once uponHello"
    ids = client.post("/tokenize", json={"prompt": "Once upon"}).json()["tokens"]
    events = sse_events(client.post("/v1/completions", json={"prompt": ids, "echo": True, "stream": True, "n": 2}))
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == {0: "Once uponHello", 1: "Once uponHello"}   # each choice echoes the prompt
    assert_error(client.post("/v1/completions", json={"prompt": "a", "echo": True, "logprobs": 1}), 400, "echo")


def test_continuous_usage_stats(client):
    events = sse_events(client.post("/v1/chat/completions", json={
        "messages": HELLO, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    content = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert [e["usage"]["completion_tokens"] for e in content] == [1, 2]
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in content)
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2
    plain = sse_events(client.post("/v1/chat/completions", json={
        "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}))
    assert all(e["usage"] is None for e in plain[:-2])            # without it, only the last chunk has usage
