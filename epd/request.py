"""One generation request as the scheduler sees it.

Lifecycle: WAITING (queued, nothing allocated) -> RUNNING (pages allocated as its tokens are
computed; prefill in chunks, then one token per step) -> FINISHED (pages freed, exactly once).
`num_computed` counts tokens whose KV is in the cache; the tokens still to compute are
`all_ids[num_computed:]`, so prefill and decode are the same operation.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from epd.detokenizer import IncrementalDetokenizer
from epd.inputs import ProcessedInput
from epd.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """What a step produced for one request (the unit streamed to clients)."""
    rid: str
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: dict | None = None


@dataclass
class Request:
    rid: str
    inp: ProcessedInput
    params: SamplingParams
    detok: IncrementalDetokenizer
    max_total_tokens: int                 # prompt + output may not exceed this
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: dict | None = None
    cached_tokens: int = 0
    image_embeds: torch.Tensor | None = None    # [num_image_tokens, hidden]
    image_index: torch.Tensor | None = None     # [prompt_len], row into image_embeds or -1
    output_logprobs: list[float] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.inp.input_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def pending_tokens(self) -> int:
        return self.total_len - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    def token_at(self, start: int, end: int) -> list[int]:
        ids = self.inp.input_ids
        if end <= len(ids):
            return ids[start:end]
        return (ids + self.output_ids)[start:end]

    def needs_encoding(self) -> bool:
        return any(im.embeddings is None for im in self.inp.images)
