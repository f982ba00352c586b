"""Paged attention in plain torch, for the CPU (and as a reference on GPU).

Per step, `plan` turns each request's page table into the flat slot indices of its context;
`attend` scatters the new K/V into the cache, gathers each request's K/V and runs SDPA with the
causal mask offset for chunked prefill (the chunk's queries see every earlier token). A layer of
chunked local attention (`chunk` C: a query at position p sees keys k <= p with k // C == p // C)
gets that mask instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epd.engine.attention.base import AttentionBackend, StepMetadata


class TorchAttentionBackend(AttentionBackend):
    def __init__(self) -> None:
        self._meta: StepMetadata | None = None
        self._read_slots: list[torch.Tensor] = []
        self._masks: list[torch.Tensor | None] = []

    def plan(self, meta: StepMetadata) -> None:
        self._meta = meta
        ps = meta.page_size
        self._read_slots, self._masks = [], []
        for q_len, kv_len, pages in zip(meta.qo_lens, meta.kv_lens, meta.page_tables, strict=True):
            pos = torch.arange(kv_len)
            table = torch.tensor(pages, dtype=torch.long)
            self._read_slots.append(table[pos // ps] * ps + pos % ps)
            self._masks.append(_causal_mask(q_len, kv_len))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               chunk: int | None = None) -> torch.Tensor:
        meta = self._meta
        assert meta is not None, "plan() must run before attend()"
        ps = kv_cache.shape[2]
        slots = meta.write_slots.to(kv_cache.device)
        kv_cache[slots // ps, 0, slots % ps] = k.to(kv_cache.dtype)
        kv_cache[slots // ps, 1, slots % ps] = v.to(kv_cache.dtype)
        out = torch.empty_like(q)
        start = 0
        for i, q_len in enumerate(meta.qo_lens):
            read = self._read_slots[i].to(kv_cache.device)
            keys = kv_cache[read // ps, 0, read % ps].to(q.dtype)   # [kv_len, Hkv, D]
            vals = kv_cache[read // ps, 1, read % ps].to(q.dtype)
            qs = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
            mask = self._masks[i] if chunk is None else _chunked_mask(q_len, meta.kv_lens[i], chunk)
            o = F.scaled_dot_product_attention(
                qs, keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0),
                attn_mask=None if mask is None else mask.to(q.device),
                is_causal=mask is None and q_len > 1, enable_gqa=True,
            )
            out[start:start + q_len] = o.squeeze(0).transpose(0, 1)
            start += q_len
        return out


def _causal_mask(q_len: int, kv_len: int) -> torch.Tensor | None:
    """None when SDPA's own causal flag (q_len == kv_len) or no mask (q_len == 1) is exact."""
    if q_len == 1 or q_len == kv_len:
        return None
    offset = kv_len - q_len
    rows = torch.arange(q_len).unsqueeze(1) + offset
    return torch.arange(kv_len).unsqueeze(0) <= rows  # [q_len, kv_len], True = attend


def _chunked_mask(q_len: int, kv_len: int, chunk: int) -> torch.Tensor:
    """[q_len, kv_len]: causal, and within the query's chunk of `chunk` positions."""
    queries = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    keys = torch.arange(kv_len).unsqueeze(0)
    return (keys <= queries) & (keys // chunk == queries // chunk)
