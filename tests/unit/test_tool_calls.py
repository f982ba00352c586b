"""`router.tool_calls`: what an answer becomes under each tool choice, whole and streamed."""

from __future__ import annotations

import json

import pytest

from router.tool_calls import ToolChoice, ToolOutput, ToolRequestError, guided_format, parse_tool_choice, parse_tools

ANSWER = ('Checking. <tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
          '<tool_call>{"name": "clock", "arguments": {"zone": "CET"}}</tool_call>')
CALLS = [("weather", {"city": "Oslo"}), ("clock", {"zone": "CET"})]


def _streamed(choice: ToolChoice, pieces: list[str]) -> tuple[str, list[dict]]:
    out = ToolOutput(choice)
    deltas = [out.stream(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return "".join(d.get("content", "") for d in deltas), [c for d in deltas for c in d.get("tool_calls", [])]


def test_hermes_calls_whole_and_streamed_at_every_split():
    content, calls, reason = ToolOutput(ToolChoice("auto")).whole(ANSWER + " Done.", "stop")
    assert content == "Checking.  Done." and reason == "tool_calls"   # text around the calls, calls out
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS
    for cut in range(len(ANSWER) + 1):
        for pieces in ([ANSWER[:cut], ANSWER[cut:]], list(ANSWER)):
            text, streamed = _streamed(ToolChoice("auto"), pieces)
            assert text == "Checking. ", (cut, text)
            assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] \
                == [(i, *call) for i, call in enumerate(CALLS)]


@pytest.mark.parametrize("text", ["plain text, no call", "a <tool_call>{not json}</tool_call>",
                                  'cut short <tool_call>{"name": "weather", "argu'])
def test_text_that_is_no_call_stays_text(text):
    assert ToolOutput(ToolChoice("auto")).whole(text, "length") == (text, [], "length")
    assert _streamed(ToolChoice("auto"), [text[:7], text[7:]]) == (text, [])


def test_a_block_that_does_not_parse_stays_text_next_to_calls_that_do():
    text = 'x <tool_call>{oops}</tool_call><tool_call>{"name": "clock", "arguments": {}}</tool_call>'
    content, calls, _ = ToolOutput(ToolChoice("auto")).whole(text, "stop")
    assert content == "x <tool_call>{oops}</tool_call>" and [c["function"]["name"] for c in calls] == ["clock"]
    assert _streamed(ToolChoice("auto"), list(text))[0] == content


def test_required_and_named_answers():
    content, calls, reason = ToolOutput(ToolChoice("required")).whole(
        '[{"name": "weather", "parameters": {"city": "Oslo"}}, {"name": "clock", "parameters": {"zone": "CET"}}]',
        "stop")
    assert content is None and reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS
    text, streamed = _streamed(ToolChoice("required"), ['[{"name": "clock", ', '"parameters": {"zone": "UTC"}}]'])
    assert text == "" and [c["function"]["name"] for c in streamed] == ["clock"]
    args = '{"city": "Oslo"}'
    assert ToolOutput(ToolChoice("named", "weather")).whole(args, "stop")[1][0]["function"] == {
        "name": "weather", "arguments": args}
    out = ToolOutput(ToolChoice("named", "weather"))
    first, rest = out.stream(args[:5], False), out.stream(args[5:], True)
    assert first["tool_calls"][0]["function"] == {"name": "weather", "arguments": args[:5]}
    assert first["tool_calls"][0]["id"]
    assert rest == {"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]}


def test_choices_and_the_schemas_that_force_them():
    city = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = parse_tools([{"type": "function", "function": {"name": "weather", "parameters": city}},
                         {"type": "function", "function": {"name": "t"}}])
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    named = guided_format(parse_tool_choice({"type": "function", "function": {"name": "weather"}}, tools, None), tools)
    assert named["json_schema"]["schema"] == tools[0]["function"]["parameters"]
    required = guided_format(ToolChoice("required"), tools, single=True)["json_schema"]["schema"]
    assert required["minItems"] == required["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in required["items"]["anyOf"]] == ["weather", "t"]
    assert guided_format(parse_tool_choice("auto", tools, "hermes"), tools) is None
    with pytest.raises(ToolRequestError, match="--tool-call-parser"):
        parse_tool_choice(None, tools, None)
