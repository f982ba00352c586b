"""Driving one request through the backend to a JSON response or an SSE stream.

Lifecycle of `respond(...)` (one backend request per choice, read as one stream: `ChoiceStream`):
1. prime: wait for the backend's first event while polling `request.is_disconnected()`. A
   `BackendError` here (input the backend refused, no capacity) is still answered with its HTTP
   status, because nothing has been sent yet.
2a. non-streaming: collect the remaining events, still polling for a disconnect, and answer one
    JSON body once every choice has finished.
2b. streaming: answer 200 with SSE: the opening chunk of each choice (chat: `delta.role`), one
    chunk per event that carries text (every event when logprobs are asked) with its choice's
    index, `finish_reason` on each choice's last content chunk, the usage chunk when
    `include_usage` after every choice has finished, then `data: [DONE]`. A `BackendError` after the
    stream began is sent as `data: {"error": ...}` then `data: [DONE]`. A route with events of its
    own passes `stream_with` (the Responses API's: router/responses_api.py) instead of these chunks.
However the request ends (finished, failed, client gone: Starlette cancels the SSE generator when
the client disconnects), every choice's backend generator is closed, which aborts it in the
backend and frees its KV pages; one choice failing fails the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from router.backend import Backend, BackendError, BackendEvent, BackendRequest
from router.choices import ChoiceStream
from router.metrics import RequestTimer
from router.openai_format import APIError, ChatFormat, Outcome, TextFormat, sse

log = logging.getLogger(__name__)
T = TypeVar("T")
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# (events, first event, format, timer, include_usage) -> the SSE text of a streamed answer
StreamWriter = Callable[[ChoiceStream, tuple[int, BackendEvent], Any, RequestTimer, bool], AsyncIterator[str]]


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def until_done_or_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts the request)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _api_error(e: BackendError) -> APIError:
    return APIError(e.status, str(e), e.param, e.code, e.retry_after)


async def respond(request: Request, backend: Backend, breqs: list[BackendRequest], fmt: ChatFormat | TextFormat,
                  timer: RequestTimer, stream: bool, include_usage: bool,
                  stream_with: StreamWriter | None = None) -> Response:
    """Answer one request whose `n` choices are `breqs` (one backend request each); streamed by
    `stream_with` where given, else as chat / text completion chunks."""
    fmt.router_ms = timer.elapsed_ms()     # the router's own work so far (epd_timings.router_ms)
    events = ChoiceStream([backend.generate(b) for b in breqs])
    try:
        first = await until_done_or_disconnected(request, events.next())
    except BackendError as e:
        await events.aclose()
        raise _api_error(e) from None
    except ClientGone:
        await events.aclose()
        timer.failed("client_disconnected")
        return Response(status_code=499)
    except BaseException:
        await events.aclose()
        raise
    if stream:
        writer = stream_with or _sse
        return StreamingResponse(writer(events, first, fmt, timer, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    outs = [Outcome() for _ in breqs]
    try:
        await until_done_or_disconnected(request, _collect(events, first, outs, timer, fmt))
    except BackendError as e:
        timer.failed(str(e.status))
        raise _api_error(e) from None
    except ClientGone:
        timer.failed("client_disconnected")
        return Response(status_code=499)
    finally:
        await events.aclose()
    timer.finished([out.final for out in outs])   # type: ignore[misc]
    return Response(orjson.dumps(fmt.response(outs)), media_type="application/json")


async def _collect(events: ChoiceStream, item: tuple[int, BackendEvent], outs: list[Outcome], timer: RequestTimer,
                   fmt: ChatFormat | TextFormat) -> None:
    keep_events = fmt.logprobs
    running = len(outs)
    while True:
        index, ev = item
        ev = fmt.shown(ev)
        timer.token(ev, index)
        out = outs[index]
        out.text += ev.text
        if keep_events:
            out.events.append(ev)
        if ev.finished:
            out.final = ev
            running -= 1
            if not running:
                return
        item = await events.next()


def mid_stream_error(e: Exception, rid: str, timer: RequestTimer) -> BackendError:
    """What a stream whose events are already sent reports for `e` (logged when unexpected; counted)."""
    if not isinstance(e, BackendError):
        log.exception("request %s failed mid-stream", rid)
        e = BackendError(f"Internal server error: {type(e).__name__}: {e}", 500)
    timer.failed(str(e.status))
    return e


async def _sse(events: ChoiceStream, first: tuple[int, BackendEvent], fmt: ChatFormat | TextFormat,
               timer: RequestTimer, include_usage: bool) -> AsyncIterator[str]:
    latest: dict[int, BackendEvent] = {}

    def chunk(payload: dict[str, Any]) -> str:
        if include_usage:   # as OpenAI: every chunk but the last has usage: null (vLLM's continuous: so far)
            payload["usage"] = fmt.usage_so_far(latest) if fmt.continuous_usage and latest else None
        return sse(payload)

    item, finals = first, [None] * events.n
    try:
        for index in range(events.n):
            opening = fmt.first_chunk(index)
            if opening is not None:
                yield chunk(opening)
        while True:
            index, ev = item
            ev = latest[index] = fmt.shown(ev)
            timer.token(ev, index)
            if ev.text or ev.finished or fmt.logprobs:
                payload = fmt.chunk(ev, index)
                if ev.finished and not include_usage:
                    fmt.with_timings(payload, ev)
                yield chunk(payload)
            if ev.finished:
                finals[index] = ev
                if all(f is not None for f in finals):
                    break
            item = await events.next()
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, never cut it silently
        yield sse(_api_error(mid_stream_error(e, fmt.rid, timer)).body())
        yield sse("[DONE]")
        return
    finally:
        await events.aclose()
        if any(f is None for f in finals):
            timer.failed("client_disconnected")   # no-op when the error branch already counted
    timer.finished(finals)
    if include_usage:
        yield sse(fmt.with_timings(fmt.usage_chunk(finals), finals[0]))
    yield sse("[DONE]")
