"""POST /v1/responses against a scripted backend: the Responses shapes (read back by the `openai`
SDK's own types), the same prompt as the equivalent chat request, the event stream, and every
parameter EPD refuses. The real engine behind it is covered by tests/e2e/test_router_openai.py."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from support import noise_image, png_bytes
from test_media import data_uri
from test_router_app import HELLO, MAX_CONTEXT, TIMINGS, assert_error, backend_timings, make_client, prompts  # noqa: F401

from router.backend import BackendError
from router.metrics import parse_exposition

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
MISSING = object()    # a field left out of the request
PNG = data_uri(png_bytes(noise_image(40, 30, seed=1)))
IMAGE_INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                            {"type": "input_image", "image_url": PNG, "detail": "auto"}]},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "A cat.", "annotations": []}]},
               {"role": "developer", "content": "Answer in one word."},
               {"type": "message", "role": "user", "content": "And its colour?"}]
IMAGE_MESSAGES = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                  {"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "And its colour?"}]


@pytest.fixture
def app(prompts):  # noqa: F811
    client, backend = make_client(prompts)
    backend.finish_reason = "stop"
    return client, backend


def events(resp) -> list[dict]:
    """The stream's events, each checked against the SDK's event types and its `event:` line."""
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.strip().split("\n\n"):
        kind, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        STREAM_EVENT.validate_python(payload)
        out.append(payload)
    return out


def test_text_input_answers_a_response_object(app):
    client, backend = app
    resp = client.post("/v1/responses", json={
        "model": "tiny", "input": "hello", "max_output_tokens": 5, "temperature": 0, "metadata": {"k": "v"},
        "store": True, "user": "u1", "truncation": "disabled", "text": {"format": {"type": "text"}}, "tools": [],
        "tool_choice": "auto", "parallel_tool_calls": False})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    parsed = Response.model_validate(body)
    assert parsed.output_text == "Hello!" and parsed.status == "completed" and parsed.incomplete_details is None
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == "tiny"
    item = body["output"][0]
    assert item["id"].startswith("msg_") and (item["role"], item["status"]) == ("assistant", "completed")
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert (body["metadata"], body["user"], body["max_output_tokens"], body["temperature"]) == ({"k": "v"}, "u1", 5, 0)
    assert body["parallel_tool_calls"] is False and body["error"] is None and body["tools"] == []
    prompt = len(backend.requests[0].input_ids)
    assert body["usage"] == {"input_tokens": prompt, "output_tokens": 3, "total_tokens": prompt + 3,
                             "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}}
    assert backend_timings(body["epd_timings"]) == TIMINGS
    params = backend.requests[0].params
    assert (params.max_new_tokens, params.temperature) == (5, 0.0)
    client.post("/v1/chat/completions", json={"messages": HELLO})
    assert backend.requests[0].input_ids == backend.requests[1].input_ids    # the same prompt as the chat request


def test_messages_with_an_image_and_instructions_are_the_chat_prompt(app):
    client, backend = app
    resp = client.post("/v1/responses", json={"input": IMAGE_INPUT, "instructions": "Be brief."})
    assert resp.status_code == 200, resp.text
    assert resp.json()["instructions"] == "Be brief."
    client.post("/v1/chat/completions", json={"messages": IMAGE_MESSAGES})
    ours, chat = backend.requests
    assert len(ours.images) == 1 and ours.images[0].size == (40, 30)
    assert ours.input_ids == chat.input_ids
    assert ours.params.max_new_tokens == MAX_CONTEXT - len(ours.input_ids)     # no max_output_tokens: the context


def test_max_output_tokens_reached_is_incomplete(app):
    client, backend = app
    backend.finish_reason = "length"
    for stream in (False, True):
        resp = client.post("/v1/responses", json={"input": "hello", "max_output_tokens": 3, "stream": stream})
        body = events(resp)[-1]["response"] if stream else resp.json()
        assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["output"][0]["status"] == "incomplete" and body["max_output_tokens"] == 3
        assert Response.model_validate(body).output_text == "Hello!"
    assert [r.params.max_new_tokens for r in backend.requests] == [3, 3]


def test_stream_events_in_order_and_deltas_join_to_the_text(app):
    client, backend = app
    request = {"input": IMAGE_INPUT, "instructions": "Be brief.", "temperature": 0, "max_output_tokens": 8}
    whole = client.post("/v1/responses", json=request).json()
    streamed = events(client.post("/v1/responses", json={**request, "stream": True}))
    assert [e["type"] for e in streamed] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in streamed] == list(range(len(streamed)))
    created, completed = streamed[0]["response"], streamed[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == completed["id"]
    text = "".join(e["delta"] for e in streamed if e["type"] == "response.output_text.delta")
    assert text == Response.model_validate(whole).output_text == Response.model_validate(completed).output_text
    assert streamed[7]["text"] == text and streamed[8]["part"]["text"] == text
    item_ids = {e["item_id"] for e in streamed if "item_id" in e} | {streamed[9]["item"]["id"]}
    assert item_ids == {completed["output"][0]["id"]}
    assert completed["status"] == "completed" and completed["usage"]["output_tokens"] == 3
    assert {r.params.temperature for r in backend.requests} == {0.0}


def test_backend_errors_before_and_after_the_stream_began(app):
    client, backend = app
    backend.fail_at = (0, BackendError("no decode node is available", 503, code="no_capacity"))
    for stream in (False, True):
        assert_error(client.post("/v1/responses", json={"input": "hello", "stream": stream}), 503, code="no_capacity")
    backend.fail_at = (2, BackendError("decode node died", 503))
    streamed = events(client.post("/v1/responses", json={"input": "hello", "stream": True}))
    assert "".join(e.get("delta", "") for e in streamed) == "Hello"
    assert streamed[-1] == {"type": "error", "sequence_number": len(streamed) - 1, "code": "service_unavailable_error",
                            "message": "decode node died", "param": None}
    assert not any(e["type"] == "response.completed" for e in streamed)


def test_metrics_count_responses(app):
    client, backend = app
    client.post("/v1/responses", json={"input": "hello"})
    client.post("/v1/responses", json={"input": "hello", "stream": True})
    backend.fail_at = (1, BackendError("decode node died", 503))
    client.post("/v1/responses", json={"input": "hello", "stream": True})
    samples = parse_exposition(client.get("/metrics").text)
    model = ("model_name", "tiny")
    assert samples[("epd:request_success_total", (("finished_reason", "stop"), model))] == 2
    assert samples[("epd:request_failure_total", (model, ("reason", "503")))] == 1
    assert samples[("epd:generation_tokens_total", (model,))] == 6


REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "not stored"),
    ({"conversation": "conv_1"}, "conversation", "not stored"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "not supported"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"background": True}, "background", "not supported"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "not supported"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format", "only text.format"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"truncation": "auto"}, "truncation", "disabled"),
]
BAD_INPUT = [
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]}, "input[0].type", "only messages"),
    ({"input": [{"role": "tool", "content": "42"}]}, "input[0].role", "unsupported role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type",
     "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0].image_url", "file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/y.png"}]}]},
     "input[0].content[0].image_url", "unsupported URL scheme"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": PNG, "detail": "huge"}]}]},
     "input[0].content[0].detail", "'auto', 'low' or 'high'"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": PNG}]}]},
     "input[0].content[0].type", "only allowed in user messages"),
    ({"input": "hello", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": "hello", "max_output_tokens": MAX_CONTEXT}, "max_output_tokens", "maximum context length is 4096"),
    ({"input": "x " * MAX_CONTEXT}, "input", "maximum context length"),
    ({"input": "hello", "temperature": -1}, "temperature", ""),
    ({"input": MISSING}, "input", "Field required"),
]


@pytest.mark.parametrize("payload, param, text", REFUSED + BAD_INPUT)
def test_what_epd_cannot_do_is_a_400_naming_the_parameter(app, payload, param, text):
    client, backend = app
    body = {k: v for k, v in {"input": "hello", **payload}.items() if v is not MISSING}
    err = assert_error(client.post("/v1/responses", json=body), 400, param, text=text)
    message = err["message"]   # the request's own names, not the chat request's
    assert "messages[" not in message and "the messages" not in message and "max_tokens" not in message
    assert not backend.requests, "nothing may reach the backend"


def test_unknown_model_and_api_key(prompts):  # noqa: F811
    client, _ = make_client(prompts, api_key="sekret")
    assert_error(client.post("/v1/responses", json={"input": "hello"}), 401, code="invalid_api_key")
    resp = client.post("/v1/responses", json={"model": "gpt-4o", "input": "hello"},
                       headers={"Authorization": "Bearer sekret"})
    assert_error(resp, 404, "model", "model_not_found")
