"""OpenAI tool calling for chat completions: `tools`, `tool_choice`, and `tool_calls` in answers.

What each `tool_choice` does (vLLM's behaviour, which OpenAI clients are written against):
- "none": the tools go to the chat template (which may show them to the model); the answer is text.
- a named function, `{"type": "function", "function": {"name": N}}`: the answer is constrained
  (xgrammar, the `response_format` path) to a JSON object following N's `parameters`, and is
  returned as one call of N (`finish_reason` "stop", as OpenAI's).
- "required": constrained to a JSON array of `{"name", "parameters"}` objects, each naming one of
  the tools, at least one; each becomes a call (`finish_reason` "tool_calls").
- "auto" (the default when tools are given): the model decides; its text is searched for Hermes-style
  calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (what Qwen2 / Qwen2.5 models
  are trained to write). Only with the operator's `--tool-call-parser hermes`, else a 400, as vLLM.
`ToolOutput.stream` turns streamed text into OpenAI's deltas: a named call's arguments stream as
they come, Hermes calls each in one delta once its closing tag is in (a block that does not parse
stays text), "required" calls at the end. `ToolOutput.whole` gives a finished answer's (content,
tool_calls, finish_reason): what the stream's deltas add up to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes",)
OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ToolRequestError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    mode: str                    # "none" | "auto" | "required" | "named"
    name: str | None = None      # the named function


def parse_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools` checked, as the chat template takes them (`{"type": "function", "function": ...}`)."""
    if not isinstance(tools, list) or not tools:
        raise ToolRequestError("tools must be a non-empty list of function tools", "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolRequestError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                                   f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ToolRequestError("parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
        if fn["name"] in names:
            raise ToolRequestError(f"two tools are named {fn['name']!r}", f"tools[{i}].function.name")
        names.add(fn["name"])
        out.append({"type": "function", "function": {**fn, "parameters": dict(params)}})
    return out


def parse_tool_choice(choice: Any, tools: list[dict[str, Any]], parser: str | None) -> ToolChoice:
    if choice is None:
        choice = "auto"
    if choice in ("none", "required") or (choice == "auto" and parser):
        return ToolChoice(choice)
    if choice == "auto":
        raise ToolRequestError('"auto" tool choice needs the server to run with --tool-call-parser; '
                               'use "required", name a function, or "none"', "tool_choice")
    fn = choice.get("function") if isinstance(choice, Mapping) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise ToolRequestError('must be "none", "auto", "required" or {"type": "function", "function": '
                               '{"name": ...}}', "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolRequestError(f"no tool is named {name!r}", "tool_choice.function.name")
    return ToolChoice("named", name)


def guided_format(choice: ToolChoice, tools: list[dict[str, Any]], single: bool = False) -> dict[str, Any] | None:
    """The `response_format` that forces a named or required call (`single`: one call at most, for
    parallel_tool_calls false); None for "none" / "auto"."""
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if choice.mode == "named":
        schema = params[choice.name]   # type: ignore[index]
    elif choice.mode == "required":
        one_of = [{"type": "object", "properties": {"name": {"const": name}, "parameters": p},
                   "required": ["name", "parameters"], "additionalProperties": False} for name, p in params.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}, **({"maxItems": 1} if single else {})}
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    """One entry of `tool_calls` (with `index`: of a streamed delta's)."""
    out = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return out if index is None else {"index": index, **out}


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def hermes_call(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one `<tool_call>` block's body; None when it is not a call."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        return None
    return value["name"], _arguments(value.get("arguments", {}))


def required_calls(text: str) -> list[tuple[str, str]] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, Mapping) and isinstance(v.get("name"), str)
                                              for v in value):
        return None
    return [(v["name"], _arguments(v.get("parameters", {}))) for v in value]


class ToolOutput:
    """One choice's answer under a tool choice other than "none"."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._pending = ""       # streamed text not yet sent
        self._in_call = False    # (auto) inside a <tool_call> block
        self._calls = 0          # calls sent so far

    def whole(self, text: str, finish_reason: str | None) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """(content, tool_calls, finish_reason) of a finished answer."""
        if self.choice.mode == "named":
            return None, [call(self.choice.name, text)], finish_reason   # type: ignore[arg-type]
        delta = ToolOutput(self.choice).stream(text, True)   # what streaming gives, put together
        calls = [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
        if not calls:   # no call (or none that parses): the text is the answer
            return text, [], finish_reason
        return delta.get("content"), calls, "tool_calls" if finish_reason == "stop" else finish_reason

    def stream(self, text: str, finished: bool) -> dict[str, Any]:
        """The delta for the next piece of streamed text (all that is left when `finished`): its
        text (`content`) before the calls that closed (`tool_calls`), either absent when empty."""
        pieces = self._pieces(text, finished)
        delta: dict[str, Any] = {}
        content = "".join(p["content"] for p in pieces if "content" in p)
        if content:
            delta["content"] = content
        calls = [c for p in pieces for c in p.get("tool_calls", [])]
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _pieces(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if self.choice.mode == "named":
            first = self._calls == 0
            self._calls = 1
            if not text and not first:
                return []
            fn = {"name": self.choice.name, "arguments": text} if first else {"arguments": text}
            head = {"id": call_id(), "type": "function"} if first else {}
            return [{"tool_calls": [{"index": 0, **head, "function": fn}]}]
        self._pending += text
        if self.choice.mode == "required":
            return self._required_end() if finished else []
        return self._hermes(finished)

    def _required_end(self) -> list[dict[str, Any]]:
        calls = required_calls(self._pending)
        if not calls:
            return [{"content": self._pending}] if self._pending else []
        self._calls = len(calls)
        return [{"tool_calls": [call(n, a, i) for i, (n, a) in enumerate(calls)]}]

    def _hermes(self, finished: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                body, closed, rest = self._pending.partition(CLOSE)
                if not closed:
                    break
                parsed = hermes_call(body.strip())
                out.append({"tool_calls": [call(*parsed, self._calls)]} if parsed else
                           {"content": OPEN + body + CLOSE})
                self._calls += bool(parsed)
                self._pending, self._in_call = rest, False
                continue
            head, found, rest = self._pending.partition(OPEN)
            if not found:
                cut = len(self._pending) - (0 if finished else _partial_tag(self._pending))
                head, self._pending = self._pending[:cut], self._pending[cut:]
            else:
                self._pending, self._in_call = rest, True
            if head and not (self._calls and not head.strip()):
                out.append({"content": head})
            if not found:
                break
        if finished and self._in_call:   # an unclosed block: it was text after all
            out.append({"content": OPEN + self._pending})
            self._pending = ""
        return out

    @property
    def called(self) -> bool:
        return self._calls > 0 and self.choice.mode != "named"


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>` (held back while streaming)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
