"""CUDA-graph decode: one captured forward per batch-size bucket, replayed for pure-decode steps.

Lifecycle:
  1. `CudaGraphDecodeRunner(model, kv, attention, max_bs, future)` allocates the static buffers,
     sized for the largest bucket: token ids, positions (the model's rows), KV write slots (one int64 device
     buffer, filled by one host->device copy per step from a pinned staging buffer) and the
     float32 logits. A token id may be a placeholder (-1 - row): the graph reads it from
     `future[row]`, where the step before left its sampled tokens (overlap schedule);
  2. `capture()` (once, at start-up) captures, largest bucket first and sharing one memory
     pool, embed -> decoder layers -> norm -> LM head for every bucket (1, 2, 4, 8, 16, 24, 32,
     48, 64, 80, ... up to max_bs). Each bucket has its own flashinfer decode wrapper with
     fixed-size buffers; all share one page-indices buffer (one replay runs at a time);
  3. per step, `can_run(chunks)` says whether the step is pure decode and fits a bucket; `run`
     pads the batch to the bucket (padding rows read and write slot 0 of the dummy page 0),
     plans the bucket's wrapper on the host, replays and returns the logits view [n, vocab].
A model with cross-attention layers also gets, per bucket, a `CrossGraphDecode` (each row's image
rows as page lists and row ranges in fixed buffers) that `prepare` plans with the same copy.
Anything else (prefill chunks, a batch above the largest bucket, a layer callback) runs eagerly.
Under tensor parallelism each rank holds its own runner and graphs (their collectives captured
inside): the leader's `prepare` sends the staged inputs, the other ranks `stage` and `replay` them.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from epd.engine.attention.base import GraphDecodeBucket
from epd.engine.attention.cross import token_segments
from epd.engine.attention.flashinfer_backend import FlashInferBackend
from epd.engine.kv_pool import KVCache, KVCacheSpec
from epd.engine.model_runner import decode_positions, resolve_placeholders, token_positions, write_slots
from epd.engine.scheduler import Chunk
from epd.engine.tensor_parallel import TPLeader, broadcast
from epd.kernels import split_kv_decode
from epd.kernels.cross_decode import CrossGraphDecode
from epd.kernels.split_kv_decode import SplitKVGraphSource
from epd.layers.parallel import tp_group

log = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_source(backend: object, model: torch.nn.Module, spec: KVCacheSpec,
                 device: torch.device) -> FlashInferBackend | SplitKVGraphSource | None:
    """Where the graphs' decode attention comes from: the flashinfer backend; for a model with
    chunked local attention (stepped eagerly by the torch backend) the split-KV kernels; else none."""
    if isinstance(backend, FlashInferBackend):
        return backend
    if getattr(model, "chunked_attention", False) and split_kv_decode.triton is not None:
        return SplitKVGraphSource(spec.num_kv_heads, spec.page_size, device)
    return None


def graph_buckets(max_bs: int) -> list[int]:
    """Bucket sizes up to the first one that holds max_bs."""
    out = []
    for b in _BUCKETS:
        out.append(b)
        if b >= max_bs:
            return out
    return out


class CudaGraphDecodeRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCache, attention: FlashInferBackend | SplitKVGraphSource,
                 max_bs: int, future: torch.Tensor, leader: TPLeader | None = None) -> None:
        """attention: where each bucket's decode attention comes from (`graph_decode`). Under
        tensor parallelism every rank captures the same buckets; `leader` (rank 0's) sends each
        step's staged inputs to the other ranks, which `stage` and `replay` them, and each replay
        starts by broadcasting rank 0's `future` (the tokens it sampled) so placeholders resolve
        alike everywhere."""
        self.model = model
        self.leader = leader
        self.group = tp_group() if tp_group().size > 1 else None
        self.future = future   # the step before's sampled tokens, which placeholder ids read
        self.kv = kv
        self.attention = attention
        self.buckets = graph_buckets(max_bs)
        self.max_bs = n = self.buckets[-1]
        dev = attention.device
        self.rows = r = model.position_rows
        # [ids | positions row 0 | ... | row r-1 | slots], each n long; zeros = token 0 at slot 0
        self._host = torch.zeros((r + 2) * n, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros((r + 2) * n, dtype=torch.int64, device=dev)
        self._copied = torch.cuda.Event()
        self.logits = torch.empty(n, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self._indices = torch.zeros(kv.pool.num_pages + n, dtype=torch.int32, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._attn: dict[int, GraphDecodeBucket] = {}
        self._cross: dict[int, CrossGraphDecode] = {}   # models with cross-attention layers only
        self.has_cross = bool(getattr(model, "cross_layers", ()))
        self._checked_cross: tuple[list[Chunk], list] | None = None   # can_run's rows, which prepare plans
        self.replays = 0
        self.capture_seconds = 0.0

    # ---- start-up -------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.attention.device)
        for bs in reversed(self.buckets):
            attn = self.attention.graph_decode(bs, self._indices)
            attn.plan_padded([], [])  # every row padding: one token on the dummy page
            self._attn[bs] = attn
            if self.has_cross:
                self._cross[bs] = CrossGraphDecode(bs, self.kv.spec.num_kv_heads, self.kv.pool.num_pages,
                                                   self.attention.device)
                self._cross[bs].plan([])
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy inits and autotuning stay out of the graph
                    self._forward(bs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward(bs)
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs (batch %s) in %.2fs", len(self.buckets),
                 ",".join(map(str, self.buckets)), self.capture_seconds)

    def _forward(self, bs: int) -> None:
        n = self.max_bs
        if self.group is not None:
            broadcast(self.group, self.future)
        ids = resolve_placeholders(self._dev[:bs], self.future)
        r = self.rows
        positions = self._dev[n:(r + 1) * n].view(r, n)[:, :bs]
        attn = self._attn[bs]
        attn.slots = self._dev[(r + 1) * n:(r + 1) * n + bs]
        extra = {"cross": self._cross[bs]} if self.has_cross else {}
        hidden = self.model(self.model.embed(ids), positions, attn, self.kv.layers, **extra)
        self.logits[:bs].copy_(self.model.lm_head(hidden))

    # ---- per step -------------------------------------------------------------------------------
    def can_run(self, chunks: list[Chunk]) -> bool:
        if not chunks or len(chunks) > self.max_bs:
            return False
        for c in chunks:
            req = c.req
            if c.length != 1 or (req.image_index is not None and c.start < req.prompt_len):
                return False
        if not self.has_cross:
            return True
        self._checked_cross = (chunks, self._cross_rows(chunks))
        return self._cross[self.bucket(len(chunks))].fits(self._checked_cross[1])

    def _cross_rows(self, chunks: list[Chunk]) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
        """Each decoded token's cross pages, the row ranges it reads and whether it sees an image
        (what `can_run` found for these chunks, if it just checked them)."""
        if self._checked_cross is not None and self._checked_cross[0] is chunks:
            return self._checked_cross[1]
        rows = []
        for c in chunks:
            req = c.req
            if req.cross_pages:
                segments, sees = token_segments(req.inp.cross_rows, req.inp.cross_spans, req.prompt_len, c.start)
                rows.append((req.cross_pages, segments, sees))
            else:
                rows.append(([], [], False))
        return rows

    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] (a view of the static buffer, valid until the next run)."""
        n = len(chunks)
        bs = self.bucket(n)
        self.prepare(chunks, bs)
        self.replay(bs)
        return self.logits[:n]

    @torch.inference_mode()
    def prepare(self, chunks: list[Chunk], bs: int) -> None:
        """Stage the step's inputs (one copy) and plan the bucket's attention; no device sync
        unless the previous step's copies have not finished reading their host buffers (with
        the overlap schedule the step before is still running: its copies ran before it)."""
        ids = [c.req.output_ids[c.start - c.req.prompt_len] if c.start >= c.req.prompt_len
               else c.req.inp.input_ids[c.start] for c in chunks]
        pos = decode_positions(chunks)   # [n], or [rows, n] below for a last prompt token
        if pos is None:
            pos = np.concatenate([token_positions(c.req, c.start, c.start + 1) for c in chunks], axis=1)
        tables = [c.req.page_array() for c in chunks]
        slots = write_slots(chunks, tables, self.kv.spec.page_size)
        kv_lens = [c.start + 1 for c in chunks]
        cross = self._cross_rows(chunks) if self.has_cross else None
        if self.leader is not None:
            self.leader.graph_step(bs, ids, np.broadcast_to(pos, (self.rows, len(ids))), slots, kv_lens, tables, cross)
        self.stage(bs, ids, pos, slots, kv_lens, tables, cross)

    @torch.inference_mode()
    def stage(self, bs: int, ids: list[int], pos: np.ndarray, slots: np.ndarray, kv_lens: list[int],
              tables: list[np.ndarray], cross: list | None) -> None:
        """One step's inputs into the static buffers and the bucket's attention planned (what
        `prepare` found, or, on a tensor-parallel rank, what the leader sent)."""
        m = self.max_bs
        self._copied.synchronize()
        host, n = self._host_np, len(ids)
        host[:] = 0
        host[:n] = ids
        r = self.rows
        host[m:(r + 1) * m].reshape(r, m)[:, :n] = pos
        host[(r + 1) * m:(r + 1) * m + n] = slots
        self._dev.copy_(self._host, non_blocking=True)
        self._attn[bs].plan_padded(kv_lens, tables)
        if self.has_cross:
            self._cross[bs].plan(cross)
        self._copied.record()   # after the plan's copies too: its host buffers are free once this completes

    @torch.inference_mode()
    def replay(self, bs: int) -> None:
        self._graphs[bs].replay()
        self.replays += 1
