"""Runs one scheduled step of the language model over the paged KV cache.

`run(chunks)` gathers the step's token ids, embeds them (splicing image embeddings in at image
placeholder positions), builds M-RoPE positions and the attention metadata once, runs the model
and returns the logits of the chunks that end at their request's last token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from epd.attention.base import AttentionBackend, StepMetadata
from epd.kv_pool import KVCache
from epd.models.qwen2_vl_text import Qwen2VLLanguageModel
from epd.request import Request
from epd.scheduler import Chunk


def attach_image_embeddings(req: Request, dtype: torch.dtype, device: torch.device) -> None:
    """Concatenate the request's image embeddings and index them by prompt position."""
    images = req.inp.images
    if not images:
        return
    req.image_embeds = torch.cat([im.embeddings for im in images]).to(device, dtype)  # type: ignore[misc]
    index = torch.full((req.prompt_len,), -1, dtype=torch.long)
    row = 0
    for im, start in zip(images, req.inp.image_offsets, strict=True):
        index[start:start + im.num_tokens] = torch.arange(row, row + im.num_tokens)
        row += im.num_tokens
    req.image_index = index


class ModelRunner:
    def __init__(self, model: Qwen2VLLanguageModel, kv: KVCache, backend: AttentionBackend,
                 device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.backend = backend
        self.device = device

    def step_inputs(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        ids, positions, slots = [], [], []
        for c in chunks:
            req, end = c.req, c.start + c.length
            ids.extend(req.token_at(c.start, end))
            positions.append(_positions(req, c.start, end))
            slots.append(self.kv.slots(req.pages, c.start, end))
        meta = StepMetadata(
            qo_lens=[c.length for c in chunks],
            kv_lens=[c.start + c.length for c in chunks],
            page_tables=[c.req.pages for c in chunks],
            page_size=self.kv.spec.page_size,
            write_slots=torch.cat(slots).to(self.device),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        return input_ids, torch.cat(positions, dim=1).to(self.device), meta

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
                    embeds[offset + hit.to(self.device)] = req.image_embeds[rows[hit].to(self.device)]
            offset += c.length
        return embeds

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Returns logits [num sampling chunks, vocab] (float32), in chunk order."""
        input_ids, positions, meta = self.step_inputs(chunks)
        embeds = self.embed(chunks, input_ids)
        self.backend.plan(meta)
        hidden = self.model(embeds, positions, self.backend, self.kv.layers, after_layer)
        ends = torch.tensor(meta.qo_lens).cumsum(0) - 1
        rows = [int(ends[i]) for i, c in enumerate(chunks) if c.samples]
        return self.model.logits(hidden[rows])


def _positions(req: Request, start: int, end: int) -> torch.Tensor:
    """[3, end - start] M-RoPE positions; tokens past the prompt use index + delta."""
    plen = req.prompt_len
    parts = []
    if start < plen:
        parts.append(req.inp.positions[:, start:min(end, plen)])
    if end > plen:
        gen = torch.arange(max(start, plen), end) + req.inp.mrope_delta
        parts.append(gen.unsqueeze(0).expand(3, -1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
