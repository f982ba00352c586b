"""One streamed chat completion, timed token by token.

Lifecycle of a request: ``build_body`` makes the JSON body; ``send_request`` starts the
clock, POSTs it, and then either fails fast on a non-200 status or reads the SSE stream
event by event (``_StreamReader``): the first chunk with non-empty content fixes TTFT, each
later content chunk adds one inter-token latency, a ``usage`` chunk gives the server's token
counts and an ``epd_timings`` field the EPD router's stage timings. The request succeeds
only when the stream ends properly (``[DONE]`` or a ``finish_reason``) with some content;
HTTP errors, ``{"error": ...}`` events, dropped connections and timeouts all end up as a
``RequestOutput`` with ``success=False`` and the error text, never as an exception.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.config import ClientConfig
from bench.datasets import BenchRequest


@dataclass
class RequestOutput:
    """What the client saw of one request (all times in seconds)."""

    success: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0  # the server's count when it reports usage, else the dataset's estimate
    text_tokens: int | None = None
    image_tokens: int | None = None
    epd_timings: dict[str, float] | None = None
    start: float = 0.0  # time.perf_counter() when the request was sent
    end: float = 0.0  # ... and when its stream ended


def build_body(cfg: ClientConfig, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "temperature": cfg.temperature}
    body.update(req.extra_body)  # a jsonl line may carry its own sampling settings
    body.update(
        {
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def error_text(payload: Any) -> str:
    """A readable message from an OpenAI / FastAPI style error payload."""
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if key in payload:
                return error_text(payload[key])
        return json.dumps(payload)[:300]
    return str(payload)[:300]


def _http_error(status: int, raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    try:
        detail = error_text(json.loads(text))
    except ValueError:
        detail = text.strip()[:300]
    return f"HTTP {status}: {detail}" if detail else f"HTTP {status}"


class _StreamReader:
    """Folds SSE events of one response into a ``RequestOutput``."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out
        self.finished = False  # saw [DONE] or a finish_reason
        self.content_chunks = 0
        self.last_token_at = 0.0

    def on_content(self, now: float) -> None:
        if self.content_chunks == 0:
            self.out.ttft = now - self.out.start
        else:
            self.out.itls.append(now - self.last_token_at)
        self.last_token_at = now
        self.content_chunks += 1

    def on_event(self, data: str, now: float) -> bool:
        """Handle one ``data:`` payload; False once the stream should not be read further."""
        if data == "[DONE]":
            self.finished = True
            self.out.end = now
            return False
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError(f"unexpected event {data[:80]!r}")
        if obj.get("error"):
            self.out.error = f"stream error: {error_text(obj)}"
            return False
        self.on_object(obj, now, streamed=True)
        return True

    def on_object(self, obj: dict[str, Any], now: float, streamed: bool) -> None:
        for choice in obj.get("choices") or []:
            part = choice.get("delta" if streamed else "message") or {}
            if part.get("content") or part.get("reasoning_content"):
                self.on_content(now)
            if choice.get("finish_reason"):
                self.finished = True
        if obj.get("usage"):
            usage = obj["usage"]
            self.out.output_tokens = int(usage.get("completion_tokens") or 0)
            self.out.prompt_tokens = int(usage.get("prompt_tokens") or self.out.prompt_tokens)
        split = obj.get("epd_prompt_tokens")   # EPD's own: the prompt's text and image tokens
        if isinstance(split, dict):
            if "text_tokens" in split:
                self.out.text_tokens = int(split["text_tokens"])
            if "image_tokens" in split:
                self.out.image_tokens = int(split["image_tokens"])
        if isinstance(obj.get("epd_timings"), dict):
            self.out.epd_timings = {k: float(v) for k, v in obj["epd_timings"].items() if v is not None}

    def finish(self) -> None:
        """Decide success once the stream is over."""
        out = self.out
        if out.error:
            return
        if not self.finished:
            out.error = "stream ended before [DONE] or a finish_reason"
        elif self.content_chunks == 0:
            out.error = "response held no content"
        else:
            out.success = True
            if out.output_tokens <= 0:  # no usage from the server: one token per content chunk
                out.output_tokens = self.content_chunks


async def _read_sse(resp: httpx.Response, reader: _StreamReader) -> None:
    """Feed each event to ``reader``. After ``[DONE]`` the rest of the body (normally just the
    chunked-encoding terminator) is still read, so the connection returns to the pool."""
    data_lines: list[str] = []
    done = False
    async for line in resp.aiter_lines():
        if done:
            continue
        if line.startswith("data:"):
            data_lines.append(line[5:].strip())
            continue
        if line.strip() or not data_lines:
            continue  # comments, event names and keep-alives carry nothing we time
        # a blank line ends one event; its data lines join with newlines (SSE spec)
        done = not reader.on_event("\n".join(data_lines), time.perf_counter())
        data_lines = []
        if reader.out.error:
            return  # after an error event the server owes us nothing; drop the connection
    if data_lines and not done:
        reader.on_event("\n".join(data_lines), time.perf_counter())


async def _exchange(http: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, out: RequestOutput) -> None:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    reader = _StreamReader(out)
    out.start = time.perf_counter()
    async with http.stream("POST", cfg.chat_url, json=build_body(cfg, req), headers=headers) as resp:
        if resp.status_code != 200:
            out.error = _http_error(resp.status_code, await resp.aread())
            return
        if "text/event-stream" in resp.headers.get("content-type", ""):
            await _read_sse(resp, reader)
        else:  # a server that ignored stream=true answered with one JSON body
            obj = json.loads(await resp.aread())
            if not isinstance(obj, dict):
                raise ValueError("response body is not a JSON object")
            if obj.get("error"):
                out.error = f"error: {error_text(obj)}"
            else:
                reader.on_object(obj, time.perf_counter(), streamed=False)
    reader.finish()


async def send_request(http: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest) -> RequestOutput:
    """Send ``req`` and time it; never raises for server or network trouble."""
    out = RequestOutput(prompt_tokens=req.prompt_len, start=time.perf_counter())
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            await _exchange(http, cfg, req, out)
    except TimeoutError:
        out.error = f"timed out after {cfg.request_timeout_s:g} s"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    except ValueError as exc:  # malformed JSON in the response
        out.error = f"bad response: {exc}"
    except Exception as exc:  # anything else a strange server provokes fails this request only
        out.error = f"unexpected {type(exc).__name__}: {exc}"
    out.end = out.end or time.perf_counter()  # [DONE] ends the request, not the socket's close
    out.e2e = out.end - out.start
    if out.error:
        out.success = False
    return out
