"""The contract between the HTTP layer and whatever generates tokens behind it.

The HTTP layer (OpenAI schemas, SSE, errors, metrics) turns a request into a `BackendRequest`
(prompt text already rendered by the chat template, images already fetched and validated,
sampling parameters validated) and consumes `BackendEvent`s. Two backends implement it:

- `LocalBackend` (router/local_backend.py): a colocated `EngineCore` stepping in a thread, for
  single-process serving and for testing the HTTP layer;
- `DisaggBackend` (router/pipeline.py): the encoder / prefill / decode node pools over ZMQ,
  UCX and Redis.

Cancelling the async iterator returned by `generate` (client disconnect, `aclose()`,
`CancelledError`) must abort the request everywhere and free its KV pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from epd.engine.inputs import ProcessedInput
from epd.engine.sampling import SamplingParams


class BackendError(Exception):
    """A failure the client should see; `status` maps to the HTTP code (400 bad input, 503 no capacity...)."""

    def __init__(self, message: str, status: int = 500, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None, failed_node: str = "",
                 failed_role: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.retry_after = retry_after   # seconds: a Retry-After header (the cluster is short of something)
        self.failed_node = failed_node   # an encoder or prefill node that died before the first token
        self.failed_role = failed_role   # and its pool


@dataclass
class BackendRequest:
    rid: str
    prompt: str | None                     # rendered prompt text with one placeholder per image
    input_ids: list[int] | None            # or token ids (exactly one of prompt / input_ids)
    images: list[Any]                      # PIL images, in placeholder order
    params: SamplingParams
    arrival_time: float = 0.0
    inp: ProcessedInput | None = None      # the router's processing of the above (tokenized, expanded,
                                           # image layouts): used as is, never redone


@dataclass
class BackendEvent:
    token_id: int
    text: str                               # newly visible text (stop strings already cut)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None       # OpenAI's: "stop" | "length" | "abort"
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    image_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)   # queue_ms, encode_ms, prefill_ms, transfer_ms...


class Backend(Protocol):
    model_name: str
    max_context: int

    def generate(self, req: BackendRequest) -> AsyncIterator[BackendEvent]:
        """Yield one event per generated token; the last has finished=True. Raises BackendError."""
        ...

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): ready once at least one node of each pool is up."""
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: num_requests_running, num_requests_waiting, kv_cache_usage_perc, pool sizes."""
        ...

    async def close(self) -> None:
        ...


def openai_finish_reason(reason: dict | None) -> str | None:
    """Engine finish reasons ({"type": "stop", "matched": ...}) -> OpenAI's strings."""
    if reason is None:
        return None
    kind = reason.get("type")
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(kind, str(kind))
