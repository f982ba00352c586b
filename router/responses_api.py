"""OpenAI's Responses API, POST /v1/responses, for the text and image inputs EPD serves.

Lifecycle of a request (`add_responses_routes`):
1. auth -> body -> `ResponsesRequest` (400 naming the field) -> model name (404) -> what EPD
   cannot do (`unsupported()`: stored state, tools, background runs, reasoning, structured text,
   `include`; a 400 naming the parameter) -> its items as chat messages (`chat_messages()`) ->
   backend queue (429);
2. `PromptBuilder.chat` renders, fetches the images and tokenizes, and `Router.sampling` resolves
   the sampling through a `ChatCompletionRequest` of the same fields (`max_output_tokens` is its
   max_tokens); their 400s are renamed to what the request called the field (`_renamed`);
3. `serving.respond` runs it: one `response` object, or with `stream` the events of
   `ResponsesFormat` (`event: <type>` + `data:` with a `sequence_number` from 0): response.created,
   response.in_progress, response.output_item.added, response.content_part.added, one
   response.output_text.delta per backend event with text, response.output_text.done,
   response.content_part.done, response.output_item.done, response.completed (the whole response,
   as vLLM sends it; no `[DONE]`). A failure after the stream began is an `error` event, then the
   stream ends.
Nothing is stored (`store` is accepted and changes nothing), so a request always carries its whole
conversation. An answer cut by its token budget is `incomplete` (reason `max_output_tokens`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from epd.engine.sampling import SamplingParams
from router.backend import BackendError, BackendEvent, BackendRequest
from router.choices import ChoiceStream
from router.metrics import RequestTimer
from router.openai_format import APIError, Outcome, TokenText, _Format, sse, usage
from router.schemas import ChatCompletionRequest
from router.serving import mid_stream_error, respond

if TYPE_CHECKING:
    from router.app import Router

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")   # an assistant turn given back carries its output_text


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses. Unknown fields are ignored, as on the other routes."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None               # accepted; nothing is stored
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled", "auto"] | None = None
    tool_choice: Any = None
    # refused when given (`unsupported`)
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    tools: list[Any] | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(parameter, why) for the first parameter this server cannot honour, else None."""
        text_format = ((self.text or {}).get("format") or {"type": "text"})
        stateless = "responses are not stored here; send the whole conversation in `input`"
        refusals = [
            (self.previous_response_id is not None, "previous_response_id", stateless),
            (self.conversation is not None, "conversation", stateless),
            (self.prompt is not None, "prompt", "stored prompt templates are not supported"),
            (bool(self.tools), "tools", "tools are not supported on /v1/responses (use /v1/chat/completions)"),
            (self.tool_choice not in (None, "auto", "none"), "tool_choice", "tool_choice needs tools, which are "
                                                                            "not supported on /v1/responses"),
            (bool(self.background), "background", "background responses are not supported"),
            (any(v is not None for v in (self.reasoning or {}).values()), "reasoning",
             "reasoning options are not supported"),
            (not isinstance(text_format, dict) or text_format.get("type") != "text", "text.format",
             "only text.format {'type': 'text'} is supported on /v1/responses"),
            (bool(self.include), "include", "include is not supported (no logprobs, reasoning or tool outputs "
                                            "are produced)"),
            (bool(self.top_logprobs), "top_logprobs", "logprobs are not supported on /v1/responses"),
            (self.truncation == "auto", "truncation", "only truncation 'disabled' is supported: an input over "
                                                      "the context is a 400"),
        ]
        return next(((param, why) for bad, param, why in refusals if bad), None)

    def chat_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(the chat messages `PromptBuilder.chat` takes, where each came from: "instructions",
        "input" or "input[i]"). Raises APIError naming the input item or part."""
        messages: list[dict[str, Any]] = []
        origins: list[str] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
            origins.append("instructions")
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            origins.append("input")
        else:
            for i, item in enumerate(self.input):
                messages.append(_message(item, f"input[{i}]"))
                origins.append(f"input[{i}]")
        return messages, origins

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The same request as a chat completion, for `Router.sampling`."""
        return ChatCompletionRequest(messages=messages, max_tokens=self.max_output_tokens,
                                     temperature=self.temperature, top_p=self.top_p, stream=self.stream)


def _message(item: Any, at: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise APIError(400, f"{at}: must be a message object with 'role' and 'content'", at)
    kind = item.get("type", "message")
    if kind != "message":
        raise APIError(400, f"{at}.type: input items of type {kind!r} are not supported; only messages (text and "
                            "images) are", f"{at}.type", "unsupported_parameter")
    role = item.get("role")
    if role not in _ROLES:
        raise APIError(400, f"{at}.role: unsupported role {role!r} (expected user, system, developer or assistant)",
                       f"{at}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise APIError(400, f"{at}.content: must be a string or a list of content parts", f"{at}.content")
    return {"role": role, "content": [_part(part, f"{at}.content[{j}]") for j, part in enumerate(content)]}


def _part(part: Any, at: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PARTS:
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{at}.text: must be a string", f"{at}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url.strip():
            why = ("images by file_id are not supported; give image_url" if part.get("file_id") is not None
                   else "must be an image URL or a data URI")
            raise APIError(400, f"{at}.image_url: {why}", f"{at}.image_url")
        image = {"url": url} if part.get("detail") is None else {"url": url, "detail": part["detail"]}
        return {"type": "image_url", "image_url": image}
    raise APIError(400, f"{at}.type: unsupported content part type {kind!r} (expected input_text, input_image or "
                        "output_text)", f"{at}.type")


def _renamed(e: APIError, origins: list[str]) -> APIError:
    """An error of the chat path, naming the field as the Responses request called it."""
    old = e.param
    if old is None:
        return e
    new = {"max_tokens": "max_output_tokens", "messages": "input"}.get(old, old)
    at = re.match(r"messages\[(\d+)\](.*)", old)
    if at is not None and int(at.group(1)) < len(origins):
        origin, rest = origins[int(at.group(1))], at.group(2)
        if origin.startswith("input["):   # a list item: parts keep their index; image_url is the URL itself here
            new = origin + rest.replace(".image_url.url", ".image_url").replace(".image_url.detail", ".detail")
        else:                             # a plain string (instructions, or input as a string) has one name
            new = origin
    if new == old:
        return e
    return APIError(e.status, e.message.replace(old, new), new, e.code, e.retry_after)


class ResponsesFormat(_Format):
    """The Responses shapes of one request: the `response` object, and its stream's events in order
    (`opening`, `delta` per text event, `closing`; `error` instead where it fails)."""

    def __init__(self, body: ResponsesRequest, params: SamplingParams, model: str, tokens: TokenText,
                 prompt_tokens: int) -> None:
        super().__init__(f"resp_{uuid.uuid4().hex}", model, tokens, False, prompt_tokens)
        self.body, self.params = body, params
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0

    def whole(self, text: str, final: BackendEvent | None) -> dict[str, Any]:
        """The response object: in progress until `final`, then with its output and usage."""
        body, reason = self.body, final.finish_reason if final is not None else None
        status = "in_progress" if final is None else "completed" if reason == "stop" else "incomplete"
        out = {"id": self.rid, "object": "response", "created_at": self.created, "model": self.model,
               "status": status, "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
               "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
               "temperature": self.params.temperature, "top_p": self.params.top_p,
               "parallel_tool_calls": body.parallel_tool_calls is not False,
               "tool_choice": body.tool_choice or "auto", "tools": [],
               "text": {"format": {"type": "text"}}, "truncation": "disabled", "previous_response_id": None,
               "background": False, "metadata": body.metadata or {}, "user": body.user,
               "output": [], "usage": None}
        if final is not None:
            out["output"] = [self._item(status, [self._part(text)])]
            out["usage"] = _usage(final, self.prompt_tokens)
            self.with_timings(out, final)
        return out

    def response(self, outs: list[Outcome]) -> dict[str, Any]:
        """The non-streamed answer (`serving.respond` calls it with the one choice)."""
        return self.whole(outs[0].text, outs[0].final)

    def opening(self) -> list[str]:
        started = self.whole("", None)
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started),
                self._event("response.output_item.added", output_index=0, item=self._item("in_progress", [])),
                self._event("response.content_part.added", **self._where(), part=self._part(""))]

    def delta(self, text: str) -> str:
        return self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def closing(self, text: str, final: BackendEvent) -> list[str]:
        whole = self.whole(text, final)
        item = whole["output"][0]
        return [self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
                self._event("response.content_part.done", **self._where(), part=item["content"][0]),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event("response.completed", response=whole)]

    def error(self, e: BackendError) -> str:
        err = APIError(e.status, str(e), e.param, e.code).body()["error"]
        return self._event("error", code=err["code"] or err["type"], message=err["message"], param=err["param"])

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n" + sse(payload)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "role": "assistant", "status": status, "content": content}

    @staticmethod
    def _part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(final: BackendEvent, prompt_tokens: int) -> dict[str, Any]:
    chat = usage([final], prompt_tokens)
    # cache_write_tokens: OpenAI bills writes to its prompt cache apart; nothing is billed apart here
    details = {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"], "cache_write_tokens": 0}
    return {"input_tokens": chat["prompt_tokens"], "input_tokens_details": details,
            "output_tokens": chat["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}


async def _stream(events: ChoiceStream, first: tuple[int, BackendEvent], fmt: ResponsesFormat, timer: RequestTimer,
                  _include_usage: bool) -> AsyncIterator[str]:
    """The Responses event stream of one choice (`serving.respond`'s `stream_with`)."""
    text, item, final = "", first, None
    try:
        for line in fmt.opening():
            yield line
        while final is None:
            ev = fmt.shown(item[1])
            timer.token(ev)
            if ev.text:
                text += ev.text
                yield fmt.delta(ev.text)
            if ev.finished:
                final = ev
            else:
                item = await events.next()
    except Exception as e:  # noqa: BLE001 - events are sent: report in the stream, never cut it silently
        yield fmt.error(mid_stream_error(e, fmt.rid, timer))
        return
    finally:
        await events.aclose()
        if final is None:
            timer.failed("client_disconnected")   # no-op when the error branch already counted
    timer.finished([final])
    for line in fmt.closing(text, final):
        yield line


def add_responses_routes(app: FastAPI, router: Router) -> None:
    @app.post("/v1/responses", dependencies=[Depends(router.authorize)])
    async def responses(request: Request) -> Response:
        timer = router.metrics.timer()
        body = router.parse(ResponsesRequest, await router.read_json(request))
        messages, origins = body.chat_messages()
        router.admit()
        try:
            prepared = await router.prompts.chat(messages)
            params = router.sampling(body.chat_request(messages), prepared, "input")
        except APIError as e:
            raise _renamed(e, origins) from None
        fmt = ResponsesFormat(body, params, router.settings.served_model_name, router.token_text[False],
                              len(prepared.input_ids))
        timer.params(1, params.max_new_tokens)
        breq = BackendRequest(fmt.rid, None, prepared.input_ids, prepared.images, params, time.time(), prepared.inp)
        return await respond(request, router.backend, [breq], fmt, timer, body.stream, False,  # type: ignore[arg-type]
                             stream_with=_stream)
