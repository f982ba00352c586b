"""The HTTP layer against a scripted backend: OpenAI shapes, error statuses, limits, auth, metrics.

The backend here yields scripted events (no model runs), so every error path is cheap and exact;
the real engine behind the same app is covered by tests/e2e/test_router_openai.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from router.app import create_app
from router.backend import BackendError, BackendEvent, BackendRequest
from router.metrics import parse_exposition
from router.prompts import PromptBuilder
from router.settings import RouterSettings

MAX_CONTEXT = 4096
TIMINGS = {"queue_ms": 1.0, "encode_ms": 2.0, "prefill_ms": 3.0, "transfer_ms": 0.5, "decode_ms": 4.0}
HELLO = [{"role": "user", "content": "hello"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def backend_timings(timings: dict) -> dict:
    """The backend's stages of `epd_timings`, after checking the router's own share is there."""
    assert isinstance(timings["router_ms"], float) and timings["router_ms"] >= 0
    return {k: v for k, v in timings.items() if k != "router_ms"}


class ScriptedBackend:
    """Yields `texts` as one event each; raises `fail_at` (index, BackendError) when set."""

    model_name = "tiny"
    max_context = MAX_CONTEXT

    def __init__(self) -> None:
        self.texts = ["Hel", "lo", "!"]
        self.finish_reason = "length"      # the last event's
        self.fail_at: tuple[int, Exception] | None = None
        self.ready = True
        self.waiting = 0.0
        self.requests: list[BackendRequest] = []
        self.closed: list[str] = []        # rids whose generator was closed before finishing

    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        self.requests.append(req)
        done = False
        try:
            for i, text in enumerate(self.texts):
                if self.fail_at and self.fail_at[0] == i:
                    done = True
                    raise self.fail_at[1]
                last = i == len(self.texts) - 1
                done = last
                yield BackendEvent(token_id=10 + i, text=text, logprob=-0.5, top_logprobs=[(10 + i, -0.5)],
                                   finished=last, finish_reason=self.finish_reason if last else None,
                                   prompt_tokens=len(req.input_ids or []), completion_tokens=i + 1,
                                   cached_tokens=2, timings=TIMINGS if last else {})
        finally:
            if not done:
                self.closed.append(req.rid)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"backend": "scripted"}

    def stats(self) -> dict[str, float]:
        return {"num_requests_running": 0.0, "num_requests_waiting": self.waiting, "kv_cache_usage_perc": 0.0,
                "pool_size_encoder": 2.0, "pool_size_decode": 1.0}

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def prompts(tiny_models) -> PromptBuilder:
    return PromptBuilder(tiny_models["qwen2_vl"], MAX_CONTEXT)


def make_client(prompts: PromptBuilder, **settings: Any) -> tuple[TestClient, ScriptedBackend]:
    backend = ScriptedBackend()
    cfg = RouterSettings(model_path=prompts.config.model_path, served_model_name="tiny", **settings)
    return TestClient(create_app(backend, cfg, prompts)), backend


@pytest.fixture
def app(prompts):
    return make_client(prompts)


def assert_error(resp, status: int, param: str | None = None, code: str | None = None, text: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and (code is None or err["code"] == code)
    assert text in err["message"]
    return err


def sse_events(resp) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in resp.text.split("\n\n") if line.startswith("data: ")]


def test_chat_response_shape_usage_and_timings(app):
    client, backend = app
    body = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 5,
                                                     "logprobs": True, "top_logprobs": 1}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello!", "refusal": None, "tool_calls": []}
    assert choice["finish_reason"] == "length"
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.5] * 3
    prompt = len(backend.requests[0].input_ids)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert body["epd_prompt_tokens"] == {"image_tokens": 0, "text_tokens": prompt}
    assert backend_timings(body["epd_timings"]) == TIMINGS


def test_stream_chunks_and_usage_chunk(app):
    client, _ = app
    resp = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, None, "length"]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in content)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert backend_timings(chunks[-1]["epd_timings"]) == TIMINGS


def test_default_max_tokens_is_the_remaining_context(app):
    client, backend = app
    client.post("/v1/chat/completions", json={"messages": HELLO})
    req = backend.requests[-1]
    assert req.params.max_new_tokens == MAX_CONTEXT - len(req.input_ids)


def test_sampling_fields_reach_the_backend(app):
    client, backend = app
    client.post("/v1/chat/completions", json={
        "messages": HELLO, "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0.5, "top_p": 0.9,
        "top_k": 0, "min_p": 0.1, "seed": 3, "stop": "END", "stop_token_ids": [5], "ignore_eos": True,
        "min_tokens": 2, "repetition_penalty": 1.1, "frequency_penalty": 0.2, "presence_penalty": 0.3,
        "skip_special_tokens": False, "user": "someone", "store": False, "logit_bias": {"7": -100, "3": 2.5}})
    p = backend.requests[-1].params
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == \
        (7, 2, 0.5, 0.9, -1, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.skip_special_tokens) == (("END",), (5,), True, False)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.1, 0.2, 0.3)
    assert p.logit_bias == ((3, 2.5), (7, -100.0))


def test_text_completion_shapes(app):
    client, backend = app
    body = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 1}).json()
    assert backend.requests[-1].input_ids == [1, 2, 3]
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and choice["text"] == "Hello!"
    assert choice["logprobs"]["text_offset"] == [0, 3, 5] and len(choice["logprobs"]["top_logprobs"]) == 3
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    chunks = sse_events(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello!" and chunks[-1] == "[DONE]"
    assert backend_timings(chunks[-2]["epd_timings"]) == TIMINGS     # no usage chunk: the last content chunk has them


@pytest.mark.parametrize("payload, param, text", [
    ({"messages": HELLO, "n": 129}, "n", "less than or equal to 128"),
    ({"messages": HELLO, "tools": [TOOL]}, "tool_choice", "--tool-call-parser"),    # "auto" without a parser
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name", "no tool is named 'g'"),
    ({"messages": HELLO, "tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0]", "function"),
    ({"messages": HELLO, "tools": [TOOL, TOOL], "tool_choice": "none"}, "tools[1].function.name", "two tools"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot go with"),
    ({"messages": [*HELLO, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id", "tool_call_id"),
    ({"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f",
      "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function.arguments", "JSON object"),
    ({"messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": HELLO, "temperature": -1}, "temperature", ""),
    ({"messages": HELLO, "stop_token_ids": [10**6]}, "stop_token_ids", "outside the vocabulary"),
    ({"messages": HELLO, "logit_bias": {"10000000": 1}}, "logit_bias", "outside the vocabulary"),
    ({"messages": HELLO, "logit_bias": {"dog": 1}}, "logit_bias", "not a token id"),
    ({"messages": HELLO, "logit_bias": {"5": 250}}, "logit_bias", "outside [-100, 100]"),
    ({"messages": HELLO, "min_tokens": 9, "max_tokens": 3}, "min_tokens", "min_tokens=9"),
    ({"messages": HELLO, "max_tokens": MAX_CONTEXT}, "max_tokens", "maximum context length is 4096"),
    ({"messages": [{"role": "user", "content": "x " * MAX_CONTEXT}]}, "messages", "maximum context length"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unsupported role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
     "messages[0].content[0].image_url.url", "unsupported URL scheme"),
    ({"model": "tiny"}, "messages", "Field required"),
    ({"messages": "hello"}, "messages", ""),
])
def test_bad_chat_requests_are_400_naming_the_field(app, payload, param, text):
    client, backend = app
    assert_error(client.post("/v1/chat/completions", json=payload), 400, param, text=text)
    assert not backend.requests, "nothing may reach the backend"


def test_bad_completion_requests(app):
    client, _ = app
    assert_error(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt", text="batch")
    assert_error(client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400, "suffix")
    assert_error(client.post("/v1/completions", json={"prompt": [1, 10**7]}), 400, "prompt", text="vocabulary")


def test_malformed_bodies_unknown_model_and_routes(app):
    client, _ = app
    assert_error(client.post("/v1/chat/completions", content=b"{not json"), 400, code="invalid_json", text="JSON")
    assert_error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400, code="invalid_json")
    assert_error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}), 404, "model",
                 "model_not_found", "gpt-4o")
    assert_error(client.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"


def test_api_key(prompts):
    client, _ = make_client(prompts, api_key="sekret")
    assert_error(client.get("/v1/models"), 401, code="invalid_api_key")
    assert_error(client.post("/v1/chat/completions", json={"messages": HELLO},
                             headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    ok = client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_body_limit_queue_limit_and_health(prompts):
    client, backend = make_client(prompts, max_body_bytes=1000, max_waiting=4)
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(client.post("/v1/chat/completions", json=big), 413, code="request_too_large")
    backend.waiting = 4
    assert_error(client.post("/v1/chat/completions", json={"messages": HELLO}), 429, text="4 requests waiting")
    backend.waiting = 3
    assert client.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200
    backend.ready = False
    assert client.get("/health").status_code == 503
    backend.ready = True
    assert client.get("/health").json()["status"] == "ready"


def test_backend_error_before_and_after_the_stream_began(app):
    client, backend = app
    backend.fail_at = (0, BackendError("no decode node is available", 503, code="no_capacity"))
    for stream in (False, True):
        resp = client.post("/v1/chat/completions", json={"messages": HELLO, "stream": stream})
        assert_error(resp, 503, code="no_capacity", text="no decode node")
    backend.fail_at = (2, BackendError("decode node died", 503))
    events = sse_events(client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}))
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "decode node died"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[1:-2]) == "Hello"
    assert_error(client.post("/v1/chat/completions", json={"messages": HELLO}), 503, text="decode node died")
    backend.fail_at = (1, RuntimeError("bug in a backend"))
    events = sse_events(client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}))
    assert events[-2]["error"]["type"] == "server_error" and "bug in a backend" in events[-2]["error"]["message"]


def test_builtin_chat_template_renders_like_the_tokenizer_and_adds_its_stops(prompts, app):
    client, backend = app
    client.post("/v1/chat/completions", json={"messages": HELLO})
    builtin = PromptBuilder(prompts.config.model_path, MAX_CONTEXT, chat_template="qwen2-vl")
    client2, backend2 = make_client(builtin)
    client2.post("/v1/chat/completions", json={"messages": HELLO, "stop": ["x"]})
    assert backend2.requests[0].input_ids == backend.requests[0].input_ids
    assert backend2.requests[0].params.stop == ("x", "<|im_end|>", "<|endoftext|>")


def test_metrics_count_requests(app):
    client, _ = app
    client.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
    client.post("/v1/chat/completions", json={"messages": HELLO})
    client.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO})
    resp = client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_exposition(resp.text)
    model = ("model_name", "tiny")
    assert samples[("epd:request_success_total", (("finished_reason", "length"), model))] == 2
    assert samples[("epd:request_failure_total", (model, ("reason", "404")))] == 1
    assert samples[("epd:generation_tokens_total", (model,))] == 6
    assert samples[("epd:prefix_cache_hit_tokens_total", (model,))] == 2 * 2     # the backend's cached_tokens
    assert samples[("epd:time_to_first_token_seconds_count", (model,))] == 2
    assert samples[("epd:inter_token_latency_seconds_count", (model,))] == 4
    assert samples[("epd:stage_seconds_sum", (model, ("stage", "encode")))] == pytest.approx(2 * 0.002)
    assert samples[("epd:pool_size", (model, ("pool", "encoder")))] == 2
    assert samples[("epd:num_requests_waiting", (model,))] == 0
    assert samples[("process_resident_memory_bytes", ())] > 10 << 20   # the router process's own families
    assert samples[("process_open_fds", ())] > 0


def test_tokenize_and_detokenize(app):
    """vLLM's /tokenize gives the ids a request becomes here (the chat template applied, the same
    ids the backend gets), /detokenize turns ids back into text; bad bodies are 400s."""
    client, backend = app
    client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    chat = client.post("/tokenize", json={"model": "tiny", "messages": HELLO}).json()
    assert chat["tokens"] == backend.requests[-1].input_ids and chat["count"] == len(chat["tokens"])
    assert chat["max_model_len"] == MAX_CONTEXT
    text = client.post("/tokenize", json={"prompt": "the red cat"}).json()
    assert client.post("/detokenize", json={"tokens": text["tokens"]}).json() == {"prompt": "the red cat"}
    long = client.post("/tokenize", json={"prompt": "x " * MAX_CONTEXT}).json()   # no context check here
    assert long["count"] > MAX_CONTEXT
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": HELLO}), 400, "prompt", text="exactly one")
    assert_error(client.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens", text="outside the vocabulary")
    assert_error(client.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, "model")


def test_structured_output_without_xgrammar_is_a_clear_400(app, monkeypatch):
    """Where xgrammar is not installed (it is optional), response_format json_* is refused by name."""
    from epd.engine import structured

    structured._xgrammar.cache_clear()
    monkeypatch.setitem(sys.modules, "xgrammar", None)            # import xgrammar now fails
    try:
        client, backend = app
        resp = client.post("/v1/chat/completions", json={"messages": HELLO, "response_format": {"type": "json_object"}})
        assert_error(resp, 400, "response_format", text="needs the xgrammar package")
        assert not backend.requests
        assert client.post("/v1/chat/completions", json={"messages": HELLO, "response_format": {"type": "text"}}
                           ).status_code == 200
    finally:
        structured._xgrammar.cache_clear()


def test_auto_tool_choice_finds_hermes_calls_streamed_or_not(prompts):
    """With --tool-call-parser hermes, `<tool_call>` blocks in the answer become tool_calls (the text
    before them the content), streamed or not, wherever the backend's pieces split the tags."""
    client, backend = make_client(prompts, tool_call_parser="hermes")
    backend.finish_reason = "stop"
    backend.texts = ["Let me look. <tool", '_call>\n{"name": "f", "arguments": {"city": "Oslo"}}\n</tool_call>',
                     '\n<tool_call>{"name": "f", "arguments": {}}</tool_', "call>"]
    body = {"messages": HELLO, "tools": [TOOL], "max_tokens": 9}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["message"]["content"] == "Let me look. " and choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"city": "Oslo"}), ("f", {})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    chunks = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look. "
    streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(tc["index"], tc["function"]["name"], tc["function"]["arguments"]) for tc in streamed] == [
        (i, c["function"]["name"], c["function"]["arguments"]) for i, c in enumerate(calls)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    backend.texts = ["No tools needed: <tool_call>{broken}</tool_call>"]
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"] == {**choice["message"], "content": backend.texts[0], "tool_calls": []}
    assert choice["finish_reason"] == "stop"
