"""`n` choices: one backend request each, read at once, answered as OpenAI answers them.

The backend here scripts each choice's text from its request id and interleaves the choices'
tokens; the real engine behind `n` is covered by tests/e2e/test_router_openai.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from test_router_app import HELLO, MAX_CONTEXT, ScriptedBackend, assert_error, prompts, sse_events  # noqa: F401

from router.app import create_app
from router.backend import BackendError, BackendEvent, BackendRequest
from router.metrics import parse_exposition
from router.settings import RouterSettings


class ChoicesBackend(ScriptedBackend):
    """Choice i (the rid's `-i` suffix) says `c{i}t0 c{i}t1 ...`, i + 2 tokens, a short sleep apart so
    the choices' tokens interleave; `fail` = (choice, token index) raises there."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: tuple[int, int] | None = None
        self.tokens_sent = 0
        self.tokens_before: dict[str, int] = {}   # rid -> tokens sent (any request) when it started

    async def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        self.requests.append(req)
        self.tokens_before[req.rid] = self.tokens_sent
        choice = int(req.rid.rsplit("-", 1)[1]) if req.rid.count("-") > 1 else 0
        count, done = choice + 2, False
        try:
            for t in range(count):
                await asyncio.sleep(0.02)
                if self.fail == (choice, t):
                    done = True
                    raise BackendError(f"choice {choice} failed", 503)
                last = t == count - 1
                done = last
                self.tokens_sent += 1
                yield BackendEvent(token_id=t, text=f"c{choice}t{t} ", finished=last,
                                   finish_reason="stop" if last else None, prompt_tokens=len(req.input_ids or []),
                                   completion_tokens=t + 1, timings={"decode_ms": 1.0} if last else {})
        finally:
            if not done:
                self.closed.append(req.rid)


@pytest.fixture
def app(prompts):  # noqa: F811
    backend = ChoicesBackend()
    cfg = RouterSettings(model_path=prompts.config.model_path, served_model_name="tiny")
    return TestClient(create_app(backend, cfg, prompts)), backend


def _text(i: int) -> str:
    return "".join(f"c{i}t{t} " for t in range(i + 2))


def test_n_choices_each_from_its_own_request(app):
    client, backend = app
    body = client.post("/v1/chat/completions", json={"messages": HELLO, "n": 3, "seed": 7, "temperature": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [_text(i) for i in range(3)]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 3
    prompt = len(backend.requests[0].input_ids)
    assert body["usage"]["prompt_tokens"] == prompt                  # the prompt once
    assert body["usage"]["completion_tokens"] == 2 + 3 + 4          # every choice's tokens
    assert body["usage"]["total_tokens"] == prompt + 9
    assert sorted(r.rid for r in backend.requests) == [f"{body['id']}-{i}" for i in range(3)]
    assert sorted(r.params.seed for r in backend.requests) == [7, 8, 9]   # differ; choice 0 = the n=1 draw
    # choice 0 alone first; the others once its first token is in (its prompt is then cached)
    rid = body["id"]
    assert backend.tokens_before[f"{rid}-0"] == 0 and backend.requests[0].rid == f"{rid}-0"
    assert all(backend.tokens_before[f"{rid}-{i}"] >= 1 for i in (1, 2))
    backend.requests.clear()
    client.post("/v1/completions", json={"prompt": "hi", "n": 2, "max_tokens": 4})
    assert [r.params.seed for r in backend.requests] == [None, None]


def test_n_choices_stream_interleaved_with_their_indices(app):
    client, _ = app
    events = sse_events(client.post("/v1/chat/completions", json={
        "messages": HELLO, "n": 3, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1, 2]                                      # one opening chunk a choice
    by_index = {0: "", 1: "", 2: ""}
    for c in chunks:
        by_index[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert by_index == {i: _text(i) for i in range(3)}
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    order = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert order.index(2) < len(order) - 1 - order[::-1].index(1)   # choice 2 began before choice 1 ended
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 + 3 + 4


def test_texts_offsets_per_choice(app):
    client, _ = app
    events = sse_events(client.post("/v1/completions", json={"prompt": "hi", "n": 2, "stream": True, "logprobs": 0}))
    offsets: dict[int, list[int]] = {0: [], 1: []}
    for e in events[:-1]:
        choice = e["choices"][0]
        offsets[choice["index"]] += choice["logprobs"]["text_offset"]
    assert offsets == {0: [0, 5], 1: [0, 5, 10]}                   # each choice counts its own text


@pytest.mark.parametrize("stream", [False, True])
def test_one_failing_choice_fails_the_request_and_stops_the_others(app, stream):
    client, backend = app
    backend.fail = (1, 1)
    resp = client.post("/v1/chat/completions", json={"messages": HELLO, "n": 3, "stream": stream})
    if stream:
        events = sse_events(resp)
        assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "choice 1 failed"
    else:
        assert_error(resp, 503, text="choice 1 failed")
    rid = backend.requests[0].rid.rsplit("-", 1)[0]
    assert f"{rid}-2" in backend.closed       # still running when choice 1 failed: aborted, not left running


def test_metrics_count_a_request_of_n_choices_once(app):
    client, _ = app
    client.post("/v1/chat/completions", json={"messages": HELLO, "n": 2})
    samples = parse_exposition(client.get("/metrics").text)
    model = ("model_name", "tiny")
    assert samples[("epd:request_success_total", (("finished_reason", "stop"), model))] == 1
    assert samples[("epd:generation_tokens_total", (model,))] == 2 + 3
    assert samples[("epd:time_to_first_token_seconds_count", (model,))] == 1
    assert samples[("epd:inter_token_latency_seconds_count", (model,))] == 1 + 2   # gaps within each choice
