"""OpenAI wire shapes: errors, usage, logprobs, and the responses / SSE chunks of both endpoints.

`ChatFormat` (POST /v1/chat/completions) and `TextFormat` (POST /v1/completions) share one
interface, so the serving code drives either the same way, per request:
    first_chunk(index)       -> choice `index`'s opening chunk, or None (chat: delta.role = "assistant")
    chunk(event, index)      -> one content chunk of choice `index` (finish_reason on its last one)
    usage_chunk(finals)      -> `choices: []` + usage, sent when stream_options.include_usage
    response(outcomes)       -> the whole non-streaming response, one outcome per choice
With n > 1 choices, usage counts the prompt once and the completion tokens of every choice.
The final response and the final chunk carry the non-standard `epd_timings` (ms per stage; null
where the backend does not measure a stage) and `epd_prompt_tokens` (the prompt's image and text
tokens: usage holds only OpenAI's fields, as vLLM's), which the benchmark harness reads; `router_ms` is the
router's own share, from the request's arrival to its hand-over to the backend (reading the body,
the chat template, fetching and decoding images, tokenizing).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.backend import BackendEvent
from router.tool_calls import ToolChoice, ToolOutput

STAGES = ("queue_ms", "encode_ms", "prefill_ms", "transfer_ms", "decode_ms")
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}
_MIN_LOGPROB = -9999.0    # JSON has no -inf


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event (orjson: ~10x faster than json.dumps per chunk, bench/edge_codecs.py)."""
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n"


def epd_timings(timings: dict[str, float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {stage: None for stage in STAGES}
    out.update({k: round(float(v), 3) for k, v in timings.items() if v is not None})
    return out


@dataclass
class Outcome:
    """What a non-streaming request accumulated."""

    text: str = ""
    events: list[BackendEvent] = field(default_factory=list)
    final: BackendEvent | None = None


def usage(finals: list[BackendEvent | None], prompt_tokens: int) -> dict[str, Any]:
    """The prompt once (from the first choice's final event where it has one), every choice's
    completion tokens."""
    final = finals[0] if finals else None
    prompt = final.prompt_tokens if final is not None and final.prompt_tokens else prompt_tokens
    completion = sum(f.completion_tokens for f in finals if f is not None)
    details = {"cached_tokens": final.cached_tokens if final is not None else 0}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details}


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes byte b as one character: itself when printable, else chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


def _is_byte_level(tokenizer: Any) -> bool:
    try:
        return json.loads(tokenizer.backend_tokenizer.to_str())["decoder"]["type"] == "ByteLevel"
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


class TokenText:
    """Token id -> (text, UTF-8 bytes) shown in logprobs, cached per id. The text is the token
    decoded alone (a partial UTF-8 sequence shows U+FFFD); the bytes are the token's exact bytes
    for byte-level BPE vocabularies (Qwen), so clients can join partial characters."""

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._alphabet = _byte_level_alphabet() if _is_byte_level(tokenizer) else None
        self._lookup = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if self.as_ids:
            text = f"token_id:{token_id}"
        piece = self.tokenizer.convert_ids_to_tokens(token_id) if self._alphabet else None
        if isinstance(piece, str) and piece and all(c in self._alphabet for c in piece):  # type: ignore[operator]
            return text, [self._alphabet[c] for c in piece]  # type: ignore[index]
        return text, list(text.encode())

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        return self._lookup(token_id)


def _lp(value: float | None) -> float:
    return max(_MIN_LOGPROB, value) if value is not None else _MIN_LOGPROB


class _Format:
    object_name = ""
    chunk_name = ""

    def __init__(self, rid: str, model: str, tokens: TokenText, logprobs: bool, prompt_tokens: int,
                 created: int | None = None) -> None:
        self.rid, self.model, self.tokens, self.logprobs = rid, model, tokens, logprobs
        self.prompt_tokens = prompt_tokens
        self.created = created if created is not None else int(time.time())
        self.router_ms: float | None = None   # arrival -> hand-over to the backend (set by the serving code)
        self.include_stop_str = False         # vLLM's include_stop_str_in_output
        self.continuous_usage = False         # vLLM's stream_options.continuous_usage_stats

    def shown(self, ev: BackendEvent) -> BackendEvent:
        """The event as the client sees it: with include_stop_str_in_output, a matched stop string
        ends the text (it is cut by the backend otherwise)."""
        if self.include_stop_str and ev.finished and isinstance(ev.matched_stop, str):
            return dataclasses.replace(ev, text=ev.text + ev.matched_stop)
        return ev

    def usage_so_far(self, events: dict[int, BackendEvent]) -> dict[str, Any]:
        """Usage with every choice's tokens so far (continuous_usage_stats), from each choice's latest event."""
        return usage(list(events.values()), self.prompt_tokens)

    def envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.rid, "object": name, "created": self.created, "model": self.model, "choices": choices}

    def first_chunk(self, index: int = 0) -> dict[str, Any] | None:
        return None

    def usage_chunk(self, finals: list[BackendEvent | None]) -> dict[str, Any]:
        out = self.envelope(self.chunk_name, [])
        out["usage"] = usage(finals, self.prompt_tokens)
        return out

    def _whole(self, choices: list[dict[str, Any]], outs: list[Outcome]) -> dict[str, Any]:
        """The non-streaming response around `choices`, with usage and the first choice's timings."""
        payload = self.envelope(self.object_name, choices)
        payload["usage"] = usage([out.final for out in outs], self.prompt_tokens)
        return self.with_timings(payload, outs[0].final)

    def with_timings(self, payload: dict[str, Any], final: BackendEvent | None) -> dict[str, Any]:
        timings = dict(final.timings) if final is not None else {}
        timings["router_ms"] = self.router_ms
        payload["epd_timings"] = epd_timings(timings)
        if final is not None:   # not in usage: clients (guidellm) add image_tokens to prompt_tokens again
            images, prompt = final.image_tokens, final.prompt_tokens or self.prompt_tokens
            payload["epd_prompt_tokens"] = {"image_tokens": images, "text_tokens": prompt - images}
        return payload


class ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_choice: ToolChoice | None = None   # a tool choice other than "none": answers become tool_calls
        self._tool_streams: dict[int, ToolOutput] = {}

    def _logprobs(self, events: list[BackendEvent]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for ev in events:
            entry = self._entry(ev.token_id, ev.logprob)
            entry["top_logprobs"] = [self._entry(tid, lp) for tid, lp in ev.top_logprobs or []]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        text, raw = self.tokens(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": raw}

    def first_chunk(self, index: int = 0) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return self.envelope(self.chunk_name, [{"index": index, "delta": delta, "logprobs": None,
                                                "finish_reason": None}])

    def chunk(self, ev: BackendEvent, index: int = 0) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": ev.text}
        reason = ev.finish_reason
        if self.tool_choice is not None:
            tools = self._tool_streams.setdefault(index, ToolOutput(self.tool_choice))
            delta = tools.stream(ev.text, ev.finished)
            if tools.called and reason == "stop":
                reason = "tool_calls"
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs([ev]), "finish_reason": reason}
        return self.envelope(self.chunk_name, [choice])

    def response(self, outs: list[Outcome]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(outs):
            content, calls, reason = out.text, [], out.final.finish_reason if out.final else None
            if self.tool_choice is not None:
                content, calls, reason = ToolOutput(self.tool_choice).whole(out.text, reason)
            choices.append({"index": i,
                            "message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls},
                            "logprobs": self._logprobs(out.events), "finish_reason": reason})
        return self._whole(choices, outs)


class TextFormat(_Format):
    object_name = "text_completion"
    chunk_name = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.offsets: dict[int, int] = {}   # choice -> characters of text sent so far (logprobs.text_offset)
        self.echo: str | None = None        # the prompt's text, when `echo` asks for it before each answer

    def first_chunk(self, index: int = 0) -> dict[str, Any] | None:
        if self.echo is None:
            return None
        choice = {"index": index, "text": self.echo, "logprobs": None, "finish_reason": None}
        return self.envelope(self.chunk_name, [choice])

    def _logprobs(self, events: list[BackendEvent], start: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start
        for ev in events:
            out["tokens"].append(self.tokens(ev.token_id)[0])
            out["token_logprobs"].append(_lp(ev.logprob))
            out["top_logprobs"].append({self.tokens(t)[0]: _lp(lp) for t, lp in ev.top_logprobs or []})
            out["text_offset"].append(offset)
            offset += len(ev.text)
        return out

    def chunk(self, ev: BackendEvent, index: int = 0) -> dict[str, Any]:
        offset = self.offsets.get(index, 0)
        choice = {"index": index, "text": ev.text, "logprobs": self._logprobs([ev], offset),
                  "finish_reason": ev.finish_reason}
        self.offsets[index] = offset + len(ev.text)
        return self.envelope(self.chunk_name, [choice])

    def response(self, outs: list[Outcome]) -> dict[str, Any]:
        choices = [{"index": i, "text": (self.echo or "") + out.text, "logprobs": self._logprobs(out.events, 0),
                    "finish_reason": out.final.finish_reason if out.final else None} for i, out in enumerate(outs)]
        return self._whole(choices, outs)
