"""The tool-calling fields of OpenAI chat messages, as HF chat templates read them.

An assistant message may carry `tool_calls` (its content may then be null); a `tool` message answers
one call (`tool_call_id`, optionally the function's `name`). Templates (Qwen2.5's, Llama's) write a
call's arguments with `tojson`, so a call's `arguments` JSON string is parsed into an object here,
as vLLM does before rendering.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

ErrorOf = Callable[[str, str], Exception]   # (param, detail) -> the exception to raise


def tool_fields(msg: Mapping[str, Any], role: str, at: str, err: ErrorOf) -> dict[str, Any]:
    """The message's tool fields for the template (none: {}); `at` is its param path."""
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise err(f"{at}.tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        extra: dict[str, Any] = {"tool_call_id": call_id}
        if isinstance(msg.get("name"), str):
            extra["name"] = msg["name"]
        return extra
    calls = msg.get("tool_calls")
    if calls is None:
        return {}
    if role != "assistant":
        raise err(f"{at}.tool_calls", "only assistant messages carry tool_calls")
    if not isinstance(calls, list):
        raise err(f"{at}.tool_calls", "must be a list of tool calls")
    return {"tool_calls": [_tool_call(c, f"{at}.tool_calls[{i}]", err) for i, c in enumerate(calls)]}


def _tool_call(call: Any, at: str, err: ErrorOf) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise err(f"{at}.function.name", "a tool call needs its function's name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise err(f"{at}.function.arguments", "must be a JSON object, as a string") from None
    if not isinstance(args, Mapping):
        raise err(f"{at}.function.arguments", "must be a JSON object, as a string")
    return {"id": str(call.get("id") or ""), "type": "function",
            "function": {"name": fn["name"], "arguments": dict(args)}}
