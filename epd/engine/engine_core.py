"""The engine core: one process's model, KV cache, scheduler and step loop (colocated E+P+D).

Lifecycle: `EngineCore(config)` loads weights, sizes the KV pool and picks the attention backend
(flashinfer on CUDA in bf16/fp16, else torch); with flashinfer it also captures the CUDA graphs
for decode batch buckets (capture time is logged). `add(req)` queues a processed request; each
`step()` schedules a batch, encodes images of newly scheduled requests (batched across
requests), launches the language model and samples; it returns one `TokenEvent` per token that
reached the host in this call, after stop rules (pages of finished requests go back to the pool).

Overlap schedule (unless `disable_overlap_schedule`): each step's tokens (and logprobs) are
sampled on the device (`sampling.sample_on_device`, no host sync) and stay there
(`ModelRunner.future`; the requests' `output_ids` hold placeholders) while `step()` returns; the
next `step()` schedules and launches the following step first, then settles these tokens while
the GPU runs it. So a request's token arrives one `step()` call later, and `flush()` settles the
last step when nothing more is scheduled. Without it, each step is settled in its own call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from epd.config import ModelConfig, parse_dtype
from epd.engine.detokenizer import IncrementalDetokenizer
from epd.engine.device_copy import to_device
from epd.engine.engine_parts import make_backend, make_graphs, make_kv_cache
from epd.engine.inputs import InputError, InputProcessor, ProcessedInput, outside_vocabulary
from epd.engine.kv_pool import PagePool
from epd.engine.model_runner import ModelRunner, attach_image_embeddings
from epd.engine.request import Request, Status, TokenEvent
from epd.engine.sampling import DeviceSample, SamplingParams, SamplingRow, sample
from epd.engine.scheduler import Chunk, Scheduler
from epd.engine.tensor_parallel import TPLeader
from epd.kernels.fused_ops import fused_path
from epd.models.loader import default_device, select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    device: str | None = None            # default: cuda when present, else cpu
    dtype: str | None = None             # default: float32 on cpu, the checkpoint's dtype on cuda
    page_size: int = 16
    max_running_requests: int = 64
    max_step_tokens: int = 2048
    kv_cache_tokens: int | None = None   # default: sized from memory
    mem_fraction: float = 0.85           # of free GPU memory after weights, for the KV pool
    gpu_memory_utilization: float | None = None   # vLLM's: of the GPU's total memory, for this whole process
    seed: int | None = None              # seeds the global generator (requests without a seed draw from it)
    max_model_len: int | None = None
    load_vision: bool = True
    attention_backend: str = "auto"      # "torch" | "flashinfer" | "auto" (flashinfer on cuda where it can)
    cuda_graph_max_bs: int = 128         # largest CUDA-graph decode bucket (capped by max_running_requests)
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False   # else a step launches before the last one's tokens are read
    disable_prefix_caching: bool = False     # else cached prefixes are reused (epd.engine.prefix_cache)
    tensor_parallel_size: int = 1            # processes (GPUs) the language model is split over

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or default_device())

    def resolved_dtype(self, model: ModelConfig) -> torch.dtype:
        if self.dtype:
            return parse_dtype(self.dtype)
        return torch.float32 if self.resolved_device().type == "cpu" else model.dtype


@dataclass
class LaunchedStep:
    """One launched forward: its sampling chunks (row order) and logits; when `deferred`, its
    sampled tokens are on their way to the host (`ahead`, complete once `done` has), and
    output_ids[slot] of each chunk's request holds a placeholder until they are settled."""
    sampling: list[Chunk]
    logits: torch.Tensor | None   # kept only where the host samples from them (not deferred)
    ahead: DeviceSample | None = None   # deferred: the sample, in host memory once `done`
    done: torch.cuda.Event | None = None
    slots: list[int] = field(default_factory=list)
    fence: list[int] = field(default_factory=list)   # pages released while it runs

    @property
    def deferred(self) -> bool:
        return self.logits is None

    def free_fence(self, pool: PagePool) -> None:
        """Give back the pages released while it ran (it has finished)."""
        pool.free(self.fence)
        self.fence.clear()


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer) -> None:
        self.config = config
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.model_config = ModelConfig.from_pretrained(config.model_path)
        self.device = select_device(config.resolved_device())
        self.dtype = config.resolved_dtype(self.model_config)
        self.tokenizer = tokenizer
        t0 = time.perf_counter()
        family = self.model_config.family
        self.tp = self._start_tensor_parallel()
        try:
            self.model = family.build_lm(self.device, self.dtype)
            if fused_path(self.model.lm_head.weight):
                self.model.fuse_projections()
            self.vision = family.build_vision(self.device, self.dtype) if config.load_vision else None
            self.kv = make_kv_cache(config, self.model_config, self.model, self.device, self.dtype)
        except BaseException:
            if self.tp is not None:   # the workers fail as this process did, or wait for it: end them
                self.tp.stop(kill=True)
            raise
        if self.tp is not None:
            self.tp.layers = self.kv.layers
        log.info("loaded %s on %s (%s) in %.2fs; KV pool %d pages x %d tokens", self.model_config.model_id,
                 self.device, self.dtype, time.perf_counter() - t0, self.kv.pool.capacity, config.page_size)
        self.max_context = min(self.model_config.text.max_position_embeddings,
                               config.max_model_len or 1 << 30,
                               self.kv.pool.capacity * config.page_size)
        self.scheduler = Scheduler(self.kv, config.max_running_requests, config.max_step_tokens,
                                   prefix_caching=not config.disable_prefix_caching)
        self.runner = ModelRunner(self.model, self.kv, make_backend(config, self.model_config, self.model, self.device,
                                                                     self.dtype),
                                  self.device, max_rows=config.max_running_requests, tp=self.tp)
        self.runner.graphs = make_graphs(config, self.model, self.kv, self.runner.backend, self.device,
                                         self.runner.future, self.tp)
        self.inputs = InputProcessor(self.model_config, tokenizer, self.max_context,
                                     resize_on_device=self.device.type == "cuda")
        self._rid = 0
        self._grammars = None   # epd.engine.structured.Grammars, made by the first response_format request
        self.overlap = not config.disable_overlap_schedule
        self._in_flight: LaunchedStep | None = None

    def _start_tensor_parallel(self) -> TPLeader | None:
        """Launch and join the other ranks (--tensor-parallel-size above 1); this process is rank 0."""
        size = self.config.tensor_parallel_size
        if size == 1:
            return None
        if size < 1:
            raise ValueError(f"tensor parallel size {size} must be at least 1")
        first = self.device.index or 0
        if self.device.type == "cuda" and first + size > torch.cuda.device_count():
            raise ValueError(f"tensor parallel size {size} from GPU {first}: only {torch.cuda.device_count()} "
                             f"GPUs are visible")
        leader, self.device = TPLeader.start(self.config, self.device)
        return leader

    def close(self) -> None:
        """Stop the tensor-parallel workers (the engine cannot step after this)."""
        if self.tp is not None:
            self.tp.stop()

    def new_request(self, inp: ProcessedInput, params: SamplingParams, rid: str | None = None) -> Request:
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
            why = outside_vocabulary(ids, self.model_config.text.vocab_size)
            if why is not None:   # it would index past the logits on the device
                raise InputError(f"{name}: {why}", name)
        constraint = self._constraint(params.response_format) if params.response_format else None
        max_total = min(self.max_context, len(inp.input_ids) + params.max_new_tokens)
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        if rid is None:
            self._rid += 1
            rid = f"req-{self._rid}"
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
        return Request(rid, inp, params, detok, max_total, generator=gen, constraint=constraint)

    def _constraint(self, spec: str):
        """A fresh grammar state for `spec` (the engine's compiler made on first use)."""
        from epd.engine.structured import Grammars, StructuredOutputError

        try:
            if self._grammars is None:
                stops = sorted(set(self.model_config.eos_token_ids))
                self._grammars = Grammars(self.tokenizer, self.model_config.text.vocab_size, stops)
            return self._grammars.constraint(spec)
        except StructuredOutputError as e:
            raise InputError(str(e), "response_format") from None

    def add(self, req: Request) -> None:
        try:
            self.scheduler.add(req)
        except ValueError as e:
            raise InputError(str(e), "max_new_tokens") from None

    def step(self) -> list[TokenEvent]:
        """Schedule and launch one step, then settle the tokens of the step before it (overlap
        schedule) and, when this step needs the host to sample, this step's too. Each returned
        event is one token of a request, in order per request."""
        chunks = self.scheduler.schedule()
        current = self._launch(chunks) if chunks else None
        previous, self._in_flight = self._in_flight, None
        self.scheduler.fence = current.fence if current is not None else None
        try:
            events = self._settle_step(previous) if previous is not None else []
            if current is not None and current.deferred:
                self._in_flight = current
            elif current is not None:
                events += self._settle_step(current)
        except BaseException:
            self._abandon(current)
            raise
        return events

    @property
    def busy(self) -> bool:
        """A launched step's tokens are not settled yet: `step()` must run again."""
        return self._in_flight is not None

    def has_work(self) -> bool:
        return self.busy or self.scheduler.has_work()

    def flush(self) -> list[TokenEvent]:
        """Settle the step in flight, if any (nothing new is scheduled)."""
        previous, self._in_flight = self._in_flight, None
        return self._settle_step(previous) if previous is not None else []

    def _launch(self, chunks: list[Chunk]) -> LaunchedStep:
        self._encode_images([c.req for c in chunks if c.req.needs_images()])
        logits = self.runner.run(chunks)
        self.scheduler.advance(chunks)
        sampling = [c for c in chunks if c.samples]
        # a grammar's next mask needs this step's tokens on the host: such a step is not overlapped
        overlap = self.overlap and not any(c.req.constraint is not None for c in sampling)
        step = LaunchedStep(sampling, None if overlap else logits)
        if step.deferred:
            rows = None if self._plain_greedy(sampling) else [self.sampling_row(c.req) for c in sampling]
            step.ahead = self.runner.sample_ahead(logits, rows)
            for row, c in enumerate(sampling):
                step.slots.append(len(c.req.output_ids))
                c.req.output_ids.append(-1 - row)
        step.done = self.runner.record_done()
        return step

    def _settle_step(self, step: LaunchedStep) -> list[TokenEvent]:
        try:
            if step.done is not None:
                step.done.synchronize()
            if step.logits is not None:
                return self._commit(step.sampling, step.logits)
            assert step.ahead is not None
            result, events = step.ahead.result([c.req.params for c in step.sampling]), []
            for i, (c, slot) in enumerate(zip(step.sampling, step.slots, strict=True)):
                if c.req.status is not Status.FINISHED:   # else it ended before this step's token
                    tok, lp, top = result.row(i)
                    c.req.output_ids[slot] = tok
                    events.append(self._settle_token(c.req, slot, tok, lp, top))
            return events
        finally:
            step.free_fence(self.kv.pool)
            if self.scheduler.fence is step.fence:
                self.scheduler.fence = None

    def _abandon(self, current: LaunchedStep | None) -> None:
        """A step failed: wait for the device, then give back every fenced page."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for step in (current, self._in_flight):
            if step is not None:
                step.free_fence(self.kv.pool)
        self._in_flight, self.scheduler.fence = None, None

    def _encode_images(self, reqs: list[Request]) -> None:
        """Run the vision tower on the images of `reqs` that still have tokens to compute (a
        preempted request whose cached prefix was evicted since may need one it skipped)."""
        todo = [im for r in reqs for im, start in zip(r.inp.images, r.inp.image_offsets, strict=True)
                if im.embeddings is None and (start + im.num_tokens > r.num_computed or r.inp.cross_rows)]
        if todo:
            assert self.vision is not None, "this engine was built without a vision tower"
            for im, emb in zip(todo, self.vision.encode([im.pixels for im in todo]), strict=True):
                im.embeddings, im.pixels = emb, None
        for r in reqs:
            if r.inp.cross_rows:
                self.write_cross_rows(r)
            else:
                attach_image_embeddings(r, self.dtype, self.device)

    def write_cross_rows(self, req: Request) -> None:
        """The request's image rows' K/V into its cross pages, offered to requests with its images."""
        self.runner.write_cross_rows(req)
        self.scheduler.register_cross(req)

    def _commit(self, chunks: list[Chunk], logits: torch.Tensor) -> list[TokenEvent]:
        live = [i for i, c in enumerate(chunks) if c.req.status is not Status.FINISHED]
        if len(live) < len(chunks):   # some ended on the step before's tokens (overlap schedule)
            chunks, logits = [chunks[i] for i in live], logits[live]
        if not chunks:
            return []
        if self._plain_greedy(chunks):
            # argmax where the logits are (the GPU), one copy of B token ids back
            tokens = logits.argmax(dim=-1).tolist()
            return [self._append_token(c.req, t, None, None) for c, t in zip(chunks, tokens, strict=True)]
        result = sample(logits, [self.sampling_row(c.req) for c in chunks])
        return [self._append_token(c.req, *result.row(i)) for i, c in enumerate(chunks)]

    def _plain_greedy(self, chunks: list[Chunk]) -> bool:
        """Every row's token is its raw argmax (no sampler needed)."""
        return all(c.req.params.plain_greedy and not self._banned(c.req) for c in chunks)

    def sampling_row(self, req: Request) -> SamplingRow:
        """The sampler's view of a request; an output token still on the device (the step
        before's, overlap schedule) goes as `pending`, read from `runner.future` on the device."""
        p, out, pending = req.params, req.output_ids, None
        allowed = req.constraint.allowed(self.device) if req.constraint is not None else None
        if not p.penalised:   # the sampler reads no history
            return SamplingRow(p, req.generator, [], [], self._banned(req), allowed=allowed)
        rows = [-1 - t for t in out if t < 0]
        if rows:
            out = [t for t in out if t >= 0]
            pending = self.runner.future.index_select(0, to_device(rows, self.device, torch.long))
        return SamplingRow(p, req.generator, req.inp.input_ids + out, out, self._banned(req), pending, allowed)

    def _stop_ids(self, req: Request) -> frozenset[int]:
        if req.stop_ids is None:   # once per request: this is asked for every token
            ids = set(req.params.stop_token_ids)
            if not req.params.ignore_eos:
                ids.update(self.model_config.eos_token_ids)
            req.stop_ids = frozenset(ids)
        return req.stop_ids

    def _banned(self, req: Request) -> tuple[int, ...]:
        """Stop ids while `min_new_tokens` is not reached; never under a grammar, which allows a stop
        token only once its value is complete (and then nothing else)."""
        if req.constraint is not None or len(req.output_ids) >= req.params.min_new_tokens:
            return ()
        return tuple(self._stop_ids(req))

    def _append_token(self, req: Request, tok: int, lp: float | None, top) -> TokenEvent:
        req.output_ids.append(tok)
        return self._settle_token(req, len(req.output_ids) - 1, tok, lp, top)

    def _settle_token(self, req: Request, slot: int, tok: int, lp: float | None, top) -> TokenEvent:
        """Stop rules and detokenizing for output token `slot` (now real); placeholders after it
        are dropped if the request ends here."""
        if lp is not None:
            req.output_logprobs.append(lp)
        if req.constraint is not None:
            req.constraint.accept(tok)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        reason, text = None, ""
        if tok in self._stop_ids(req):
            reason = {"type": "stop", "matched": tok}
        else:
            text = req.detok.push(tok)
            if req.detok.stopped is not None:
                reason = {"type": "stop", "matched": req.detok.stopped}
        count = slot + 1
        if reason is None and (count >= req.params.max_new_tokens or req.prompt_len + count >= req.max_total_tokens):
            reason = {"type": "length", "length": count}
        if reason is not None:
            text += req.detok.finish()
            del req.output_ids[count:]
            self.scheduler.finish(req, reason)
        return TokenEvent(req.rid, tok, text, lp, top, reason is not None, reason, count)

    def abort(self, rid: str) -> bool:
        req = self.scheduler.abort(rid)
        if req is not None:
            req.drop_placeholders()
        return req is not None

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
