"""Runs one scheduled step of the language model over the paged KV cache.

`run(chunks)` gathers the step's token ids, embeds them (splicing image embeddings in at image
placeholder positions), builds positions (the model's `position_rows` rows: 1-D RoPE, or three
for position schemes such as M-RoPE) and the attention metadata once, runs the model
and returns the logits of the chunks that end at their request's last token. When a CUDA-graph
runner is attached (`graphs`, GPU + flashinfer) and the step is pure decode within its largest
bucket, the step replays a captured graph instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from epd.engine.attention.base import AttentionBackend, StepMetadata
from epd.engine.attention.cross import CrossChunk, CrossStep, visibility, write_rows
from epd.engine.device_copy import to_device, to_host
from epd.engine.kv_pool import KVCache
from epd.engine.request import Request
from epd.engine.sampling import DeviceSample, SamplingRow, sample_on_device
from epd.engine.scheduler import Chunk

if TYPE_CHECKING:
    from epd.engine.cuda_graph import CudaGraphDecodeRunner
    from epd.engine.tensor_parallel import TPLeader


def attach_image_embeddings(req: Request, dtype: torch.dtype, device: torch.device) -> None:
    """Concatenate the request's image embeddings and index them by prompt position (images not
    encoded, wholly inside the cached prefix, have no rows: their positions are never computed)."""
    offsets = req.inp.row_offsets or [None] * len(req.inp.images)
    encoded = [(im, start, off) for im, start, off in zip(req.inp.images, req.inp.image_offsets, offsets, strict=True)
               if im.embeddings is not None]
    if not encoded:
        return
    req.image_embeds = torch.cat([im.embeddings for im, _, _ in encoded]).to(device, dtype)  # type: ignore[misc]
    index = torch.full((req.prompt_len,), -1, dtype=torch.long)
    row = 0
    for im, start, off in encoded:
        where = torch.arange(start, start + im.num_tokens) if off is None else torch.tensor(off) + start
        index[where] = torch.arange(row, row + len(where))
        row += len(where)
    req.image_index = index


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVCache, backend: AttentionBackend,
                 device: torch.device, max_rows: int = 1, tp: TPLeader | None = None) -> None:
        self.model = model
        self.tp = tp   # tensor parallelism: every step goes to the other ranks first
        self.kv = kv
        self.backend = backend
        self.device = device
        self.graphs: CudaGraphDecodeRunner | None = None  # attached by the engine on GPU
        # the last deferred step's sampled tokens, by sampling row: what placeholders resolve to
        self.future = torch.zeros(max(1, max_rows), dtype=torch.long, device=device)

    def sample_ahead(self, logits: torch.Tensor, rows: list[SamplingRow] | None) -> DeviceSample:
        """Sample every row on the device (`sampling.sample_on_device`; rows None: every row is
        plain greedy, the argmax) into `future`, where the next step's inputs read the tokens, and
        start host copies of them and of the logprobs asked for without waiting: valid once
        `record_done()`'s event has completed."""
        n = logits.shape[0]
        if n == 0:
            return DeviceSample(torch.empty(0, dtype=torch.long))
        tokens = self.future[:n]
        if rows is None:
            torch.argmax(logits, dim=-1, out=tokens)
            drawn = DeviceSample(tokens)
        else:
            drawn = sample_on_device(logits, rows)
            tokens.copy_(drawn.tokens)
        return drawn.map(to_host)

    def record_done(self) -> torch.cuda.Event | None:
        """An event after everything launched so far (None on the CPU, where ops finish in order)."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def step_inputs(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        ids: list[int] = []
        positions: list[np.ndarray] = []
        ps = self.kv.spec.page_size
        decode_row, rows = decode_positions(chunks), self.model.position_rows
        for c in chunks:
            req, end = c.req, c.start + c.length
            plen = req.prompt_len
            ids.extend(req.output_ids[c.start - plen:end - plen] if c.start >= plen else req.token_at(c.start, end))
            if decode_row is None:
                positions.append(token_positions(req, c.start, end))
        if decode_row is not None:
            positions = [np.broadcast_to(decode_row, (rows, len(chunks)))]
        tables = [c.req.page_array() for c in chunks]
        meta = StepMetadata(
            qo_lens=[c.length for c in chunks],
            kv_lens=[c.start + c.length for c in chunks],
            page_tables=tables,
            page_size=ps,
            write_slots=to_device(torch.from_numpy(write_slots(chunks, tables, ps)), self.device),
        )
        input_ids = to_device(ids, self.device, torch.long)   # without waiting for the step still running
        if ids and min(ids) < 0:
            input_ids = resolve_placeholders(input_ids, self.future)
        return input_ids, to_device(torch.from_numpy(np.concatenate(positions, axis=1)), self.device), meta

    def embed(self, chunks: list[Chunk], input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.embed(input_ids)
        offset = 0
        for c in chunks:
            req = c.req
            if req.image_index is not None and c.start < req.prompt_len:
                end = min(c.start + c.length, req.prompt_len)
                rows = req.image_index[c.start:end]
                hit = (rows >= 0).nonzero().squeeze(1)
                if hit.numel():
                    embeds[offset + to_device(hit, self.device)] = req.image_embeds[to_device(rows[hit], self.device)]
            offset += c.length
        return embeds

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Returns logits [num sampling chunks, vocab] (float32), in chunk order."""
        if self.tp is None:
            return self._run(chunks, after_layer)
        with self.tp.stepping():   # a step that fails half-way leaves the ranks out of step: GroupLost
            return self._run(chunks, after_layer)

    def _run(self, chunks: list[Chunk], after_layer: Callable[[int], None] | None) -> torch.Tensor:
        if after_layer is None and self.graphs is not None and self.graphs.can_run(chunks):
            logits = self.graphs.run(chunks)  # every decode chunk samples
            return logits if all(c.samples for c in chunks) else logits[[c.samples for c in chunks]]
        input_ids, positions, meta = self.step_inputs(chunks)
        rows, end = [], -1
        for c in chunks:
            end += c.length
            if c.samples:
                rows.append(end)
        spliced = any(c.req.image_index is not None and c.start < c.req.prompt_len for c in chunks)
        cross = self.cross_chunks(chunks)
        if self.tp is not None:
            self.tp.step(input_ids, positions, meta, rows, spliced, cross, hooked=after_layer is not None)
            after_layer = self.tp.layer_hook(after_layer) if after_layer is not None else None
        embeds = self.embed(chunks, input_ids)
        if self.tp is not None and spliced:
            self.tp.broadcast(embeds)
        self.backend.plan(meta)
        extra = {"cross": CrossStep(cross, self.kv.pool.cross_page_rows, self.device)} if cross is not None else {}
        hidden = self.model(embeds, positions, self.backend, self.kv.layers, after_layer, **extra)
        return self.model.logits(hidden[to_device(rows, self.device, torch.long)])


    def cross_step(self, chunks: list[Chunk]) -> CrossStep | None:
        """The step's cross-attention plan; None when no request of it has image rows."""
        items = self.cross_chunks(chunks)
        return CrossStep(items, self.kv.pool.cross_page_rows, self.device) if items is not None else None

    def cross_chunks(self, chunks: list[Chunk]) -> list[CrossChunk] | None:
        """The step's cross-attention chunks (the rows each token reads); None when no request of it
        has image rows."""
        if not any(c.req.cross_pages for c in chunks):
            return None
        items = []
        for c in chunks:
            req = c.req
            if req.cross_pages:
                visible, sees = visibility(req.inp.cross_rows, req.inp.cross_spans, req.prompt_len,
                                           c.start, c.start + c.length)
                items.append(CrossChunk(c.length, req.cross_pages, visible, sees))
            else:
                items.append(CrossChunk(c.length))
        return items

    @torch.inference_mode()
    def write_cross_rows(self, req: Request) -> None:
        """The K/V of the request's image rows (its images' encoder output, in order) into its
        cross pages, in every cross-attention layer."""
        states = torch.cat([im.embeddings for im in req.inp.images]).to(self.device, self.model.lm_head.weight.dtype)
        if self.tp is not None:
            self.tp.cross_rows(states, req.cross_pages)
        for layer, k, v in self.model.cross_kv(states):
            write_rows(self.kv.layers[layer], req.cross_pages, k, v)
        req.cross_ready = True


def resolve_placeholders(ids: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """Token ids with each placeholder (-1 - row) replaced by future[row], on the ids' device."""
    return torch.where(ids >= 0, ids, future[(-1 - ids).clamp_(min=0)])


def write_slots(chunks: list[Chunk], tables: list[np.ndarray], page_size: int) -> np.ndarray:
    """int64 flat cache slot (page * page_size + offset) of every token the chunks compute, in
    order, from their requests' page arrays: a few array ops for the whole step."""
    lengths = np.fromiter((c.length for c in chunks), dtype=np.int64, count=len(chunks))
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=len(chunks))
    first_page = np.zeros(len(chunks), dtype=np.int64)
    np.cumsum([len(t) for t in tables[:-1]], out=first_page[1:])
    token_chunk_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(int(lengths.sum())) - token_chunk_start + np.repeat(starts, lengths)   # position in its request
    pages = np.concatenate(tables).astype(np.int64) if tables else np.zeros(0, dtype=np.int64)
    return pages[np.repeat(first_page, lengths) + index // page_size] * page_size + index % page_size


def decode_positions(chunks: list[Chunk]) -> np.ndarray | None:
    """int64 [n]: each chunk's position (the same in every row) when every chunk is one token past
    its prompt (a decode step), else None. One pass instead of an array a chunk."""
    row = []
    for c in chunks:
        if c.length != 1 or c.start < c.req.prompt_len:
            return None
        row.append(c.start + c.req.inp.decode_state.position_offset)
    return np.array(row, dtype=np.int64)


def token_positions(req: Request, start: int, end: int) -> np.ndarray:
    """int64 [rows, end - start] positions; tokens past the prompt have index + position offset."""
    plen, rows, offset = req.prompt_len, req.inp.positions.shape[0], req.inp.decode_state.position_offset
    if start >= plen and end - start == 1:  # a decode token
        return np.full((rows, 1), start + offset, dtype=np.int64)
    parts = []
    if start < plen:
        parts.append(req.inp.positions[:, start:min(end, plen)].numpy())
    if end > plen:
        gen = np.arange(max(start, plen), end, dtype=np.int64) + offset
        parts.append(np.broadcast_to(gen, (rows, len(gen))))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
