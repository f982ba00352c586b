"""The engine as the prefill and decode nodes drive it: operations shaped for their roles, so that
a node never reaches into the engine's scheduler, runner, page pool or private methods.

`PrefillEngine`: add a request; `step(on_prompt_done, after_layer)` schedules, runs one forward
(the hook sees each layer's K/V in the cache, for streaming), samples the first token of each
request whose prompt is done, and hands each such request's pages to the caller (`detach`), which
releases them once the hand-over is over.
`DecodeEngine`: `reserve` pages for an announced request (all it can ever need, so decoding never
preempts), `admit` it once its KV and first token have landed, `release` pages of a request that
never got admitted, and `step` the batch.
`ColocatedEngine`: the whole request in one process (a colocated node): `prepare` its input (the
images' pixels, on any thread), `add` it, `step` the batch, `abort` it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from epd.engine.engine_core import EngineCore
from epd.engine.kv_access import PoolLayers
from epd.engine.request import Request, TokenEvent
from epd.engine.sampling import SampleResult, sample
from epd.models.family import DecodeState


@dataclass
class FirstTokens:
    """The requests whose prompt the step finished, their first tokens, and the pages they held."""
    requests: list[Request]
    sampled: SampleResult
    pages: list[list[int]]
    cross_pages: list[list[int]]   # each request's image-row pages (cross-attention models; else [])


class _RoleEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    @property
    def ipc_tensors(self) -> list[torch.Tensor]:
        """What a CUDA IPC hand-over maps and writes page by page: the pool's one buffer when its
        layers are views of one (a page of it then holds a token page of every self-attention layer,
        or an image-row page of every cross-attention layer), else the per-layer tensors."""
        kv = self.core.kv
        return [kv.buffer] if kv.buffer is not None else kv.layers

    @property
    def num_layers(self) -> int:
        return len(self.core.kv.layers)

    @property
    def cross_layer_ids(self) -> list[int]:
        """Layers whose KV is image rows (cross-attention models), not tokens."""
        return list(self.core.model.cross_layers)

    @property
    def token_layer_ids(self) -> list[int]:
        """Layers whose KV is the tokens' (what the KV groups of a hand-over cover)."""
        cross = set(self.cross_layer_ids)
        return [i for i in range(len(self.core.kv.layers)) if i not in cross]

    @property
    def token_layers(self) -> PoolLayers:
        """The pool layers of `token_layer_ids`, as a hand-over gathers and scatters them."""
        ids = self.token_layer_ids
        return PoolLayers([self.core.kv.layers[i] for i in ids], ids, self.core.tp)

    @property
    def cross_layers(self) -> PoolLayers:
        """The pool layers of `cross_layer_ids` (where requests' image rows live)."""
        ids = self.cross_layer_ids
        return PoolLayers([self.core.kv.layers[i] for i in ids], ids, self.core.tp)

    @property
    def tensor_parallel_size(self) -> int:
        """Processes the language model runs over (a CUDA IPC hand-over needs one)."""
        return self.core.tp.group.size if self.core.tp is not None else 1

    @property
    def token_layer_chunks(self) -> list[int | None]:
        """Each token layer's attention chunk (None: full attention), in `token_layer_ids` order."""
        chunks = list(self.core.model.attention_chunks) or [None] * len(self.core.kv.layers)
        return [chunks[i] for i in self.token_layer_ids]

    @property
    def bytes_per_page(self) -> int:
        return self.core.kv.spec.bytes_per_page()

    def pages_for(self, num_tokens: int) -> int:
        return self.core.kv.pool.pages_for(num_tokens)

    def pages_for_rows(self, rows: int) -> int:
        """Pages `rows` image rows take (cross-attention models; 0 rows: none)."""
        return self.core.kv.pool.pages_for_rows(rows)

    def release(self, pages: list[int]) -> None:
        """Give back pages the node held outside the batch (hand-over done, failed or dropped)."""
        self.core.kv.pool.free(pages)

    def check_integrity(self, held_elsewhere: list[int]) -> None:
        self.core.scheduler.check_integrity(held_elsewhere)

    @property
    def capacity(self) -> int:
        """Pages a request can ever get."""
        return self.core.kv.pool.capacity

    @property
    def num_free(self) -> int:
        return self.core.kv.pool.num_free

    @property
    def page_size(self) -> int:
        return self.core.kv.spec.page_size

    @property
    def num_waiting(self) -> int:
        """Requests queued in the scheduler with nothing allocated yet (vLLM's num_requests_waiting)."""
        return len(self.core.scheduler.waiting)

    @property
    def queued_prompt_tokens(self) -> int:
        """Prompt tokens in the scheduler not computed yet (the prefill work queued here)."""
        sched = self.core.scheduler
        return sum(max(0, r.prompt_len - r.num_computed) for r in [*sched.waiting, *sched.running])

    @property
    def num_preemptions(self) -> int:
        """Requests the scheduler pushed back to waiting for want of pages, since start."""
        return self.core.scheduler.num_preemptions


class PrefillEngine(_RoleEngine):
    def add(self, req: Request) -> None:
        self.core.add(req)

    def abort(self, rid: str) -> None:
        self.core.abort(rid)

    def step(self, started: Callable[[Request], None],
             after_layer: Callable[[list[Request]], Callable[[int], None]]) -> FirstTokens | None:
        """One prefill forward over what the scheduler picks (None: nothing to run). `started(req)`
        sees each scheduled request; `after_layer(finishing)` makes the forward's layer hook."""
        chunks = self.core.scheduler.schedule()
        if not chunks:
            return None
        for c in chunks:
            started(c.req)
        # embeddings are in (from the encoder node): placed, or made image rows' K/V
        self.core._encode_images([c.req for c in chunks if c.req.needs_images()])
        finishing = [c.req for c in chunks if c.samples]
        logits = self.core.runner.run(chunks, after_layer=after_layer(finishing))
        self.core.scheduler.advance(chunks)
        # bans, penalties and grammar as the engine's own sampling
        sampled = sample(logits, [self.core.sampling_row(req) for req in finishing])
        held = [self.core.scheduler.detach(req) for req in finishing]
        return FirstTokens(finishing, sampled, [pages for pages, _ in held], [cross for _, cross in held])


class DecodeEngine(_RoleEngine):
    def new_request(self, input_ids: list[int], params: Any, rid: str, layouts: list[list[int]] = ()) -> Request:
        """`layouts`: the images' (a cross-attention model's decode reads their rows; ValueError
        when they do not fit the prompt)."""
        from epd.engine.inputs import ImageInput, ProcessedInput, build_processed
        from epd.models.family import ImageLayout

        config = self.core.model_config
        if layouts and config.family.cross_attention:
            images = [ImageInput(ImageLayout.from_wire(values)) for values in layouts]
            for im in images:
                config.family.check_layout(im.layout)
            inp = build_processed(config, list(input_ids), images)
        else:
            inp = ProcessedInput(list(input_ids), [], torch.empty(self.core.model.position_rows, 0, dtype=torch.long))
        return self.core.new_request(inp, params, rid=rid)

    def _need(self, req: Request) -> int:
        return self.pages_for(req.max_total_tokens) + self.pages_for_rows(req.inp.num_cross_rows)

    def fits(self, req: Request) -> bool:
        """Whether the pool could ever hold the request (prompt + every token it may generate, and
        its image rows)."""
        return self._need(req) <= self.core.kv.pool.capacity

    def reserve(self, req: Request) -> bool:
        """Allocate every page the request can need; False while the pool cannot hold it now."""
        pool = self.core.kv.pool
        if not pool.can_allocate(self._need(req)):
            return False
        req.pages = pool.allocate(pool.pages_for(req.max_total_tokens))
        req.cross_pages = pool.allocate(pool.pages_for_rows(req.inp.num_cross_rows)) if req.inp.num_cross_rows else []
        return True

    def admit(self, req: Request, first_token: int, logprob: float | None, top: Any, state: DecodeState,
              generator_state: torch.Tensor | None) -> TokenEvent:
        """The prompt's KV is in the request's pages: into the batch, with its first token."""
        req.inp.decode_state = state
        req.cross_ready = bool(req.cross_pages)
        if req.generator is not None and generator_state is not None:
            req.generator.set_state(generator_state.to(torch.uint8))
        req.num_computed = req.prompt_len
        self.core.scheduler.admit_prefilled(req)
        return self.core._append_token(req, first_token, logprob, top)

    def step(self) -> list[TokenEvent]:
        return self.core.step()

    @property
    def busy(self) -> bool:
        return self.core.busy

    def abort(self, rid: str) -> None:
        self.core.abort(rid)


class ColocatedEngine(_RoleEngine):
    def prepare(self, input_ids: list[int], images: list[Any]) -> Any:
        """The processed input of an expanded prompt and its images (`ImageInput`s with a source
        image and layout): pixels preprocessed, positions made. Safe on a worker thread (it
        touches no engine state); raises InputError / ValueError for a bad request."""
        from epd.engine.inputs import build_processed

        family = self.core.model_config.family
        for im in images:
            family.check_layout(im.layout)
        self.core.inputs.preprocess(images)
        return build_processed(self.core.model_config, list(input_ids), images)

    def new_request(self, inp: Any, params: Any, rid: str) -> Request:
        return self.core.new_request(inp, params, rid=rid)

    def add(self, req: Request) -> None:
        self.core.add(req)

    def step(self) -> list[TokenEvent]:
        return self.core.step()

    def has_work(self) -> bool:
        return self.core.has_work()

    def abort(self, rid: str) -> None:
        self.core.abort(rid)

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)
