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
from typing import Any

import numpy as np
import torch

from epd.engine.detokenizer import IncrementalDetokenizer
from epd.engine.inputs import ProcessedInput
from epd.engine.sampling import SamplingParams


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
    completion_tokens: int = 0       # output tokens up to and including this one


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
    cross_pages: list[int] = field(default_factory=list)   # its image rows (epd.engine.attention.cross)
    cross_ready: bool = False                  # the image rows' K/V are in the cross pages
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: dict | None = None
    cached_tokens: int = 0
    image_embeds: torch.Tensor | None = None    # [num_image_tokens, hidden]
    image_index: torch.Tensor | None = None     # [prompt_len], row into image_embeds or -1
    output_logprobs: list[float] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    stop_ids: frozenset[int] | None = None     # token ids that end it (the engine fills this in once)
    page_hashes: list[bytes] = field(default_factory=list, repr=False, compare=False)  # epd.engine.prefix_cache
    pages_registered: int = 0                  # leading pages offered to the prefix cache
    constraint: Any = None                     # epd.engine.structured.Constraint: response_format's grammar state
    prompt_len: int = field(default=0, init=False)
    # `pages` as int32 numpy (page_array), and the list object and length it was copied from
    _pages_np: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _pages_src: list[int] | None = field(default=None, init=False, repr=False, compare=False)
    _pages_len: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # read several times per request per step: a plain attribute (the prompt never changes)
        self.prompt_len = len(self.inp.input_ids) if self.inp is not None else 0

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def pending_tokens(self) -> int:
        return self.total_len - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len

    # With the overlap schedule a step's sampled tokens stay on the device until the next step is
    # launched: `output_ids` then ends in placeholders, -1 - row (the row of the step's sampled
    # tokens), which the next step's inputs read on the device and the engine replaces once the
    # step's tokens reach the host.
    @property
    def awaiting_token(self) -> bool:
        """The last output token is still a placeholder."""
        return bool(self.output_ids) and self.output_ids[-1] < 0

    @property
    def capped(self) -> bool:
        """No token may follow the ones it has (max_new_tokens, or the context is full): with a
        placeholder last, the request ends once that token lands, so it is not scheduled again."""
        return len(self.output_ids) >= self.params.max_new_tokens or self.total_len >= self.max_total_tokens

    def drop_placeholders(self) -> None:
        """Cut `output_ids` at its first placeholder (a finished request keeps real tokens only)."""
        for i in range(len(self.output_ids) - 1, -1, -1):
            if self.output_ids[i] >= 0:
                del self.output_ids[i + 1:]
                return
        self.output_ids.clear()

    def page_array(self) -> np.ndarray:
        """`pages` as an int32 array. A step's attention metadata joins these instead of converting
        every page of every request from Python ints each step. In place, `pages` only ever grows
        (the scheduler extends it), so only pages appended since the last call are copied; a list
        put in its place starts a fresh copy."""
        pages, n, done = self.pages, len(self.pages), self._pages_len
        if pages is self._pages_src and n == done:
            return self._pages_np[:n]
        mirror = self._pages_np
        if mirror is None or pages is not self._pages_src or done > n:
            mirror, done, self._pages_src = np.empty(max(16, n), dtype=np.int32), 0, pages
        if n > len(mirror):
            mirror = np.concatenate([mirror[:done], np.empty(max(n, 2 * len(mirror)) - done, dtype=np.int32)])
        mirror[done:n] = pages[done:n]
        self._pages_np, self._pages_len = mirror, n
        return mirror[:n]

    def token_at(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output (without joining the two lists whole)."""
        ids, n = self.inp.input_ids, self.prompt_len
        if end <= n:
            return ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return ids[start:] + self.output_ids[:end - n]

    def needs_images(self) -> bool:
        """A step of it must first have its images' embeddings (early fusion: an image still to be
        computed; cross-attention: image rows not written since its admission)."""
        if not self.inp.images:
            return False
        if self.inp.cross_rows:
            return not self.cross_ready
        return self.in_prefill and (self.image_embeds is None or self.needs_encoding())

    def needs_encoding(self) -> bool:
        """An image still to encode has a token left to compute (an image wholly inside the cached
        prefix is never encoded: its KV is there already)."""
        return any(im.embeddings is None and start + im.num_tokens > self.num_computed
                   for im, start in zip(self.inp.images, self.inp.image_offsets, strict=True))
