"""The OpenAI-compatible HTTP API (FastAPI) in front of a `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (router/responses_api.py),
GET /v1/models[/{id}], GET /health, GET /metrics. Lifecycle of a completion request:
1. auth (`--api-key`, Bearer; /v1/* only) -> read the body under `max_body_bytes` (413) -> JSON
   (400 when malformed) -> pydantic model (400 naming the field) -> model name (404
   `model_not_found`) -> fields this server cannot honour (400) -> backend queue (429);
2. `PromptBuilder` renders, fetches images, tokenizes and checks the context (400s);
3. `serving.respond` runs it on the backend and answers JSON or SSE.
Every error leaves as `{"error": {"message", "type", "param", "code"}}`, FastAPI's own 404 / 405
included; its 422 validation errors become 400s naming the field, as in vLLM. The app owns the
backend: its shutdown closes it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import epd
from epd.engine.sampling import SamplingParamError, SamplingParams
from epd.periodic_stats import PeriodicStats
from epd.prometheus_text import CONTENT_TYPE
from router import worker_metrics
from router.backend import Backend, BackendRequest
from router.choices import choice_requests
from router.metrics import RequestTimer, RouterMetrics
from router.openai_format import APIError, ChatFormat, TextFormat, TokenText
from router.prompts import Prepared, PromptBuilder
from router.responses_api import add_responses_routes
from router.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from router.serving import respond
from router.settings import RouterSettings
from router.tool_calls import ToolRequestError

stats_log = logging.getLogger("epd.stats")
log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_OPENAI_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


class Router:
    """What the routes share: settings, backend, prompt builder, metrics."""

    def __init__(self, backend: Backend, settings: RouterSettings, prompts: PromptBuilder | None = None) -> None:
        self.backend = backend
        self.settings = settings
        self.prompts = prompts or PromptBuilder(settings.model_path, lambda: backend.max_context,
                                                settings.chat_template, settings.allowed_local_media_path,
                                                settings.media_limits)
        self.metrics = RouterMetrics(settings.served_model_name)
        self.snapshots = worker_metrics.SnapshotDir(settings.worker_metrics_dir, settings.worker_index) \
            if settings.worker_metrics_dir else None
        self.token_text = {as_ids: TokenText(self.prompts.tokenizer, as_ids) for as_ids in (False, True)}
        self.started = int(time.time())

    # ---- request checks -------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'.", None,
                           "invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        too_big = APIError(413, f"The request body is larger than the {limit}-byte limit.", None, "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        try:
            return orjson.loads(body)
        except ValueError as e:
            raise APIError(400, f"The request body is not valid JSON: {e}", None, "invalid_json") from None

    def parse(self, cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise APIError(400, "The request body must be a JSON object.", None, "invalid_json")
        try:
            body = cls.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            param = _param(err["loc"])
            raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param or None) from None
        self.check_model(getattr(body, "model", None))
        problem = body.unsupported()  # type: ignore[attr-defined]
        if problem is not None:
            raise APIError(400, problem[1], problem[0], "unsupported_parameter")
        return body

    def admit(self) -> None:
        """429 while the backend's queue is full (checked before any image is fetched)."""
        waiting = self.backend.stats().get("num_requests_waiting", 0.0)
        if waiting >= self.settings.max_waiting:
            raise APIError(429, f"The server is busy ({int(waiting)} requests waiting); retry later.", None,
                           "too_many_requests")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name and name not in self.settings.model_aliases:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, prepared: Prepared,
                 where: str) -> SamplingParams:
        requested, field = body.requested_max_tokens()
        defaults = self.settings.sampling_defaults
        max_new = self.prompts.max_new_tokens(len(prepared.input_ids), requested, field, where)
        if requested is None and "max_new_tokens" in defaults:   # the generation config's, within the context
            max_new = min(max_new, int(defaults["max_new_tokens"]))
        self.prompts.check_token_ids(body.stop_token_ids, "stop_token_ids")
        self.prompts.check_token_ids(body.bias_token_ids(), "logit_bias")
        d = body.sampling_dict(max_new)
        for name, value in defaults.items():   # --generation-config: what the request left out
            if name != "max_new_tokens":
                d.setdefault(name, value)
        extra = [s for s in prepared.stop if s not in d.get("stop", [])]
        if extra:
            d["stop"] = [*d.get("stop", []), *extra]
        try:
            return SamplingParams.from_dict(d)
        except SamplingParamError as e:
            name = _OPENAI_PARAM.get(e.param or "", e.param)
            if name == "max_tokens":
                name = field
            elif name == "top_logprobs" and isinstance(body, CompletionRequest):
                name = "logprobs"
            message = str(e)
            if e.param and message.startswith(e.param):
                message = f"{name}{message[len(e.param):]}"
            raise APIError(400, message, name) from None

    async def answer(self, request: Request, body: ChatCompletionRequest | CompletionRequest, prepared: Prepared,
                     params: SamplingParams, fmt: ChatFormat | TextFormat, timer: RequestTimer) -> Response:
        """Run the request's choices (one backend request each) and answer in `fmt`, with the
        body's output options."""
        fmt.include_stop_str, fmt.continuous_usage = body.include_stop_str_in_output, body.continuous_usage
        timer.params(body.n, params.max_new_tokens)
        breq = BackendRequest(fmt.rid, None, prepared.input_ids, prepared.images, params, time.time(), prepared.inp)
        return await respond(request, self.backend, choice_requests(breq, body.n), fmt, timer, body.stream,
                             body.include_usage)


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a field path, without its union-branch tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)) and str(part).lower() not in _TYPE_TAGS:
            out += f".{part}" if out else str(part)
    return out


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def _snapshot_forever(router: Router) -> None:
    """One of several workers: what it counted, for whichever worker a scrape reaches (written when it
    changed, at most every 0.2 s: a sibling's scrape lags this worker by that much)."""
    while True:
        stats = router.backend.stats()
        router.snapshots.write_if_changed(worker_metrics.snapshot(router.metrics, worker_metrics.local_stats(stats)))
        await asyncio.sleep(0.2)


async def _log_stats_forever(router: Router) -> None:
    periodic = PeriodicStats(router.settings.stats_interval_s)
    while True:
        await asyncio.sleep(min(1.0, router.settings.stats_interval_s))
        line = router.metrics.stats_line(periodic, router.backend.stats())
        if line is not None:
            stats_log.info("router: %s", line)


def create_app(backend: Backend, settings: RouterSettings, prompts: PromptBuilder | None = None) -> FastAPI:
    router = Router(backend, settings, prompts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stats = asyncio.create_task(_log_stats_forever(router)) if settings.stats_interval_s > 0 else None
        snapshots = asyncio.create_task(_snapshot_forever(router)) if router.snapshots is not None else None
        yield
        for task in (stats, snapshots):
            if task is not None:
                task.cancel()
        await router.prompts.close()
        await backend.close()

    app = FastAPI(title="EPD router", lifespan=lifespan)
    app.state.router = router
    _install_error_handlers(app, router)
    _add_completion_routes(app, router)
    add_responses_routes(app, router)
    _add_token_routes(app, router)
    _add_info_routes(app, router)
    return app


def _install_error_handlers(app: FastAPI, router: Router) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        router.metrics.failure.inc((*router.metrics.model, ("reason", str(e.status))))
        return _error_response(e)

    @app.exception_handler(ToolRequestError)
    async def tool_error(request: Request, e: ToolRequestError) -> JSONResponse:
        return await api_error(request, APIError(400, str(e), e.param))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = _param(tuple(err["loc"]))
        return _error_response(APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"Internal server error: {type(e).__name__}: {e}"))


def _add_completion_routes(app: FastAPI, router: Router) -> None:
    auth = [Depends(router.authorize)]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        timer = router.metrics.timer()
        body = router.parse(ChatCompletionRequest, await router.read_json(request))
        tools, tool_choice = body.tool_plan(router.settings.tool_call_parser)
        router.admit()
        prepared = await router.prompts.chat(body.messages, tools=tools)
        params = router.sampling(body, prepared, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        fmt = ChatFormat(rid, router.settings.served_model_name, router.token_text[body.return_tokens_as_token_ids],
                         body.logprobs, len(prepared.input_ids))
        fmt.tool_choice = tool_choice
        return await router.answer(request, body, prepared, params, fmt, timer)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        timer = router.metrics.timer()
        body = router.parse(CompletionRequest, await router.read_json(request))
        router.admit()
        prepared = await router.prompts.completion(body.single_prompt())
        params = router.sampling(body, prepared, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        fmt = TextFormat(rid, router.settings.served_model_name, router.token_text[body.return_tokens_as_token_ids],
                         body.logprobs is not None, len(prepared.input_ids))
        if body.echo:
            prompt = body.single_prompt()
            fmt.echo = prompt if isinstance(prompt, str) else await router.prompts.detokenize(prompt)
        return await router.answer(request, body, prepared, params, fmt, timer)


def _add_token_routes(app: FastAPI, router: Router) -> None:
    """vLLM's /tokenize and /detokenize: the token ids a prompt becomes here (chat template, images
    expanded), and back."""
    auth = [Depends(router.authorize)]

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> dict[str, Any]:
        body = router.parse(TokenizeRequest, await router.read_json(request))
        prompts = router.prompts
        prepared = await (prompts.chat(body.messages, check_context=False, tools=body.template_tools())
                          if body.messages is not None
                          else prompts.completion(body.prompt, check_context=False))
        return {"count": len(prepared.input_ids), "max_model_len": router.backend.max_context,
                "tokens": prepared.input_ids}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> dict[str, Any]:
        body = router.parse(DetokenizeRequest, await router.read_json(request))
        return {"prompt": await router.prompts.detokenize(body.tokens)}


def _add_info_routes(app: FastAPI, router: Router) -> None:
    def model_card(name: str) -> dict[str, Any]:
        """vLLM's model card: `parent` and `permission` included."""
        permission = {"id": f"modelperm-{name}", "object": "model_permission", "created": router.started,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        return {"id": name, "object": "model", "created": router.started, "owned_by": "epd",
                "root": router.settings.model_path, "parent": None, "max_model_len": router.backend.max_context,
                "permission": [permission]}

    names = (router.settings.served_model_name, *router.settings.model_aliases)

    @app.get("/v1/models", dependencies=[Depends(router.authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(router.authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        router.check_model(model_id)
        return model_card(model_id)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": epd.__version__}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> JSONResponse:
        """vLLM's (SageMaker's) liveness route: 200 while ready, else 503."""
        ready, _ = await router.backend.health()
        return JSONResponse({}, status_code=200 if ready else 503)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready, details = await router.backend.health()
        return JSONResponse({"status": "ready" if ready else "not ready", **details}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        stats = router.backend.stats()
        if router.snapshots is None:
            return PlainTextResponse(router.metrics.render(stats), media_type=CONTENT_TYPE)
        router.snapshots.write(worker_metrics.snapshot(router.metrics, worker_metrics.local_stats(stats)))
        snaps = router.snapshots.read_all()
        text = worker_metrics.merged(router.metrics, snaps).render(worker_metrics.merged_stats(stats, snaps))
        return PlainTextResponse(text, media_type=CONTENT_TYPE)
