"""`epd router` as a user runs it: a real process on a free port, the real `openai` client, images
served by a local http.server, greedy output checked token for token against `transformers`.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from openai_support import IDS, assert_matches, data_uri, image_part, reference, serve_media, start_until_line
from support import hf_generate

from router.metrics import parse_exposition

KEY = "test-key"
MODEL = "tiny-vl"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Server:
    url: str
    model_path: str
    log: list[str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        samples = parse_exposition(httpx.get(f"{self.url}/metrics").text)
        return {name: v for (name, labels), v in samples.items() if len(labels) == 1}   # model_name only


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    with serve_media(tmp_path_factory.mktemp("media")) as served:
        yield served


@pytest.fixture(scope="module")
def server(tiny_models, media):
    path = tiny_models["qwen2_vl"]
    cmd = [sys.executable, "-m", "epd.cli", "router", "--model", path, "--port", "0", "--device", "cpu",
           "--served-model-name", MODEL, "--api-key", KEY, "--allowed-local-media-path", str(media.allowed_dir),
           "--log-level", "warning"]
    proc, log, line = start_until_line(cmd, "EPD router ready on ", 120, "the router")
    yield Server(line.split()[-1], path, log)
    proc.terminate()
    assert proc.wait(20) in (0, -15), "".join(log[-30:])   # uvicorn re-raises SIGTERM once shut down


def chat(server: Server, content: list[dict] | str, max_tokens: int = 10, **kw):
    return server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw)


def test_image_by_http_url_equals_transformers(server, media):
    content = [image_part(media.url("a.png")), {"type": "text", "text": "What is in this picture?"}]
    resp = chat(server, content, **IDS)
    prompt_ids, expected = reference(server.model_path, content, [media.images["a.png"]], 10)
    assert_matches(resp, prompt_ids, expected)
    assert resp.object == "chat.completion" and resp.model == MODEL
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    timings = resp.model_extra["epd_timings"]
    assert timings["prefill_ms"] > 0 and timings["router_ms"] > 0    # router_ms: the HTTP fetch of the image
    plain = chat(server, content)
    assert plain.choices[0].message.content == resp.choices[0].message.content and plain.choices[0].logprobs is None


def test_two_images_interleaved_stream_equals_non_stream(server, media):
    content = [{"type": "text", "text": "First:"}, image_part(data_uri(media.images["b.png"])),
               {"type": "text", "text": " and second:"}, image_part(media.url("a.png")),
               {"type": "text", "text": " which one is bluer?"}]
    whole = chat(server, content, **IDS)
    prompt_ids, expected = reference(server.model_path, content, [media.images["b.png"], media.images["a.png"]], 10)
    assert_matches(whole, prompt_ids, expected)
    chunks = list(chat(server, content, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    last = chunks[-1]
    assert last.choices == [] and last is not with_choices[-1]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert set(last.model_extra["epd_timings"]) >= {"queue_ms", "encode_ms", "prefill_ms", "transfer_ms",
                                                    "decode_ms"}
    assert all(c.usage is None for c in chunks[:-1])


def test_responses_api_answers_as_the_chat_completion(server, media):
    """`client.responses.create` with an image, streamed and not (and the SDK's stream helper): the
    greedy text and token counts are the chat completion's for the same input."""
    image, question = data_uri(media.images["b.png"]), "What is in this picture?"
    whole_chat = chat(server, [image_part(image), {"type": "text", "text": question}])
    expected, reason = whole_chat.choices[0].message.content, whole_chat.choices[0].finish_reason
    client = server.client()
    kw = dict(model=MODEL, max_output_tokens=10, temperature=0,
              input=[{"role": "user", "content": [{"type": "input_image", "image_url": image, "detail": "auto"},
                                                  {"type": "input_text", "text": question}]}])
    resp = client.responses.create(**kw)
    assert resp.output_text == expected and resp.model == MODEL and resp.id.startswith("resp_")
    assert resp.status == ("incomplete" if reason == "length" else "completed")
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (whole_chat.usage.prompt_tokens,
                                                                   whole_chat.usage.completion_tokens)
    events = list(client.responses.create(stream=True, **kw))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-1].response.output_text == expected and events[-1].response.id == events[0].response.id
    with client.responses.stream(**kw) as stream:
        assert stream.get_final_response().output_text == expected


def test_local_file_only_under_the_allowed_dir(server, media):
    inside = chat(server, [image_part(str(media.allowed_dir / "c.png")), {"type": "text", "text": "hi"}])
    split = inside.epd_prompt_tokens   # not in usage (vLLM sends none; guidellm would count them twice)
    assert split["image_tokens"] > 0 and split["text_tokens"] + split["image_tokens"] == inside.usage.prompt_tokens
    assert set(inside.usage.prompt_tokens_details.model_dump(exclude_none=True)) == {"cached_tokens"}
    with pytest.raises(openai.BadRequestError) as err:
        chat(server, [image_part(str(media.allowed_dir.parent / "a.png")), {"type": "text", "text": "hi"}])
    assert "outside the allowed media directory" in err.value.message


def test_text_completions_from_text_and_token_ids(server):
    from transformers import AutoTokenizer

    client = server.client()
    prompt = "Once upon a time there was a little cat"
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ids = AutoTokenizer.from_pretrained(server.model_path).encode(prompt, add_special_tokens=False)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    assert hf_generate(server.model_path, ids, [], 8)[:1] == [
        int(t.removeprefix("token_id:")) for t in client.completions.create(
            model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.tokens]
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + by_text.choices[0].text
    answer = by_text.choices[0].text
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == answer[:answer.index(stop)] + stop and cut.choices[0].finish_reason == "stop"


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    before = server.metrics()
    chat(server, "Say something.", max_tokens=5, extra_body={"ignore_eos": True})
    again = chat(server, "Say something.", max_tokens=5, extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["epd:generation_tokens_total"] - before.get("epd:generation_tokens_total", 0) == 10
    cached = again.usage.prompt_tokens_details.cached_tokens       # the same prompt again: from the cache
    assert 0 < cached < again.usage.prompt_tokens
    assert after["epd:prefix_cache_hit_tokens_total"] - before.get("epd:prefix_cache_hit_tokens_total", 0) >= cached
    assert after["epd:e2e_request_latency_seconds_count"] == before.get("epd:e2e_request_latency_seconds_count",
                                                                        0) + 2
    assert after["epd:num_requests_running"] == 0 and after["epd:kv_cache_usage_perc"] == 0


def raw_post(server: Server, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers or AUTH, timeout=30, **kw)


def hello(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **extra}


def with_image(url: str) -> dict:
    return hello(messages=[{"role": "user", "content": [image_part(url), {"type": "text", "text": "hi"}]}])


ERRORS = {
    "unknown_model": (lambda m: hello(model="gpt-4o"), 404, "model", "does not exist"),
    "malformed_json": (lambda m: b'{"model": "tiny-vl", "messages": [', 400, None, "not valid JSON"),
    "missing_messages": (lambda m: {"model": MODEL}, 400, "messages", "Field required"),
    "unreachable_image_url": (lambda m: with_image("http://127.0.0.1:9/none.png"), 400,
                              "messages[0].content[0].image_url.url", "image 1: URL fetch failed"),
    "missing_image": (lambda m: with_image(m.url("gone.png")), 400, "messages[0].content[0].image_url.url",
                      "HTTP 404"),
    "non_image_bytes": (lambda m: with_image(m.url("not-an-image.png")), 400,
                        "messages[0].content[0].image_url.url", "not a recognised image format"),
    "bad_data_uri": (lambda m: with_image("data:image/png;base64,@@@"), 400,
                     "messages[0].content[0].image_url.url", "not valid base64"),
    "n_above_128": (lambda m: hello(n=129), 400, "n", "less than or equal to 128"),
    "unusable_schema": (lambda m: hello(response_format={"type": "json_schema", "json_schema": {
        "schema": {"type": "nonsense"}}}), 400, "response_format", "cannot be used"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, media, case):
    if case == "unusable_schema":
        pytest.importorskip("xgrammar")   # without it every json_schema is refused by the package's name
    make, status, param, text = ERRORS[case]
    resp = raw_post(server, make(media))
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and text in err["message"] and err["type"] == "invalid_request_error"
    assert raw_post(server, hello()).status_code == 200


def test_openai_client_sees_typed_errors(server):
    with pytest.raises(openai.NotFoundError) as nf:
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def wait_until_idle(server: Server, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["epd:num_requests_running"] == 0 and m["epd:kv_cache_pages_in_use"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"request still holds pages {timeout}s after the client left: {server.metrics()}")


LONG = hello(max_tokens=3000, ignore_eos=True, temperature=0)


def disconnects(server: Server) -> float:
    """How many requests the server saw abandoned by their client."""
    key = ("epd:request_failure_total", (("model_name", MODEL), ("reason", "client_disconnected")))
    return parse_exposition(httpx.get(f"{server.url}/metrics").text).get(key, 0.0)


def test_client_disconnect_mid_stream_frees_pages(server):
    before = disconnects(server)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH,
                      timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        lines = resp.iter_lines()    # held open: dropping the iterator would already close the stream
        chunks = 0
        while chunks < 4:
            chunks += '"content"' in next(lines)
        during = server.metrics()
    assert during["epd:num_requests_running"] == 1 and during["epd:kv_cache_pages_in_use"] > 0
    wait_until_idle(server)
    assert disconnects(server) == before + 1


def test_client_disconnect_while_waiting_for_a_json_answer_frees_pages(server):
    before = disconnects(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, headers=AUTH, timeout=1.0)
    wait_until_idle(server)
    assert disconnects(server) == before + 1


def test_concurrent_requests_all_complete(server):
    prompts = [f"Tell me about the number {i}." for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: chat(server, p, max_tokens=12, extra_body={"ignore_eos": True}), prompts))
    assert [r.usage.completion_tokens for r in results] == [12] * 6
    assert len({r.id for r in results}) == 6
    wait_until_idle(server)


def test_n_choices_from_the_engine(server):
    """n > 1 through the real engine: greedy choices all equal the single answer; seeded draws
    give choice 0 the n = 1 draw and the others draws of their own; streamed choices equal the
    non-streamed ones."""
    one = chat(server, "Count with me:", max_tokens=8)
    three = chat(server, "Count with me:", max_tokens=8, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12,
              temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    single = client.chat.completions.create(**kw)
    many = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in many.choices]
    assert texts[0] == single.choices[0].message.content and len(set(texts)) == 3
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(n=3, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert list(streamed.values()) == texts
    wait_until_idle(server)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["animal", "legs"],
          "properties": {"animal": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer", "maximum": 8}}}


def test_response_format_json_schema(server, media):
    """The openai client's structured output: the answer (streamed or not) parses and follows the
    schema, even from a random model; an image in the prompt changes nothing about that."""
    pytest.importorskip("xgrammar")
    rf = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True}}
    content = [image_part(media.url("a.png")), {"type": "text", "text": "Which animal, as JSON?"}]
    whole = chat(server, content, max_tokens=40, response_format=rf)
    value = json.loads(whole.choices[0].message.content)
    assert list(value) == ["animal", "legs"] and value["animal"] in ("cat", "dog", "bird")
    assert value["legs"] <= 8 and whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, content, max_tokens=40,
                                                                       response_format=rf, stream=True))
    assert streamed == whole.choices[0].message.content


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city", "unit"],
                                                           "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                                          "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"], "properties": {"zone": {"enum": ["UTC"]}}}}}


def test_tool_choice_named_or_required_gives_calls_that_follow_the_parameters(server, media):
    """A named function, or "required": even a random model answers with calls of the tools given,
    whose arguments follow their parameters; a named call's streamed arguments add up to the same."""
    pytest.importorskip("xgrammar")
    content = [image_part(media.url("a.png")), {"type": "text", "text": "What is the weather there?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = chat(server, content, max_tokens=60, tools=[WEATHER, CLOCK], tool_choice=named)
    msg, reason = whole.choices[0].message, whole.choices[0].finish_reason
    assert msg.content is None and len(msg.tool_calls) == 1 and reason == "stop"
    call = msg.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert list(args) == ["city", "unit"] and args["city"] in ("Paris", "Oslo") and args["unit"] in ("C", "F")
    chunks = chat(server, content, max_tokens=60, tools=[WEATHER, CLOCK], tool_choice=named, stream=True)
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    required = chat(server, content, max_tokens=200, tools=[WEATHER, CLOCK], tool_choice="required",
                    parallel_tool_calls=False)
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and required.choices[0].finish_reason == "tool_calls"
    assert calls[0].function.name in ("get_weather", "get_time") and json.loads(calls[0].function.arguments)


def test_a_tool_result_goes_back_to_the_model(server):
    """The next turn carries the assistant's call and the tool's answer: accepted, rendered into the
    prompt by the model's template, and answered."""
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "minus seven degrees"}]
    resp = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                   tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.tool_calls in (None, []) and resp.usage.completion_tokens == 5
    ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}, headers=AUTH).json()
    text = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids["tokens"]}, headers=AUTH).json()
    assert "minus seven degrees" in text["prompt"]


def test_cache_salt_isolates_cached_prefixes_over_http(server):
    """`cache_salt` (vLLM's field) through the openai client: cached tokens only under one salt."""
    text = "A long shared system prompt about red cats and blue dogs. " * 8

    def cached(salt: str) -> int:
        resp = chat(server, text, max_tokens=2, extra_body={"cache_salt": salt})
        return resp.usage.prompt_tokens_details.cached_tokens

    first, other, same = cached("tenant-a"), cached("tenant-b"), cached("tenant-a")
    assert first == 0 and other == 0 and same > 0
