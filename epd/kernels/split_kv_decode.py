"""Paged decode attention for CUDA-graph buckets: split-KV Triton kernels (bf16/fp16 KV).

A decode step reads each request's whole context once per layer. At small batch that is little
data (1024 tokens of a 3B model: 1 MB per layer) spread over few heads (2 KV heads), and what
costs is latency: flashinfer's decode (tensor-core kernel + state merge) takes ~11 us per layer
for it on an H200, ~15% of a 3B decode step. Here:

1. `_split_kv_kernel`, grid (batch, KV heads, splits): each program takes one KV head of one
   request and one contiguous slice of its tokens, walks them in 16-token blocks through the
   page table, and computes the attention of that head's whole GQA group (query rows padded to
   a 16-row tensor-core tile) over its slice with an online softmax; it writes the slice's
   normalized output and log-sum-exp (fp32). The split count is fixed per bucket (the grid is
   part of the graph) so that batch x KV heads x splits fills the GPU; each request's slices are
   sized from its current length, so one captured graph serves any context length.
2. `_merge_kernel`, grid (batch x query heads, head_dim / 32): weights the slices by their
   softmax mass.

Measured on an H200 (bench/gpu_attention.py, 1024-token contexts): faster than flashinfer's
tensor-core decode at batch 1 and 8, slower from 32 on, where flashinfer's kernel streams the
KV at 2.2-3.4 TB/s; so graphs use it for buckets up to `MAX_BATCH` only.

`SplitKVGraphDecode` is a drop-in for the flashinfer graph wrapper (`plan_padded`, `slots`,
`attend`): its page indptr / indices / lengths live in fixed device buffers that `plan_padded`
refreshes before each replay. Padding rows read one token of the dummy page 0. A layer of chunked
local attention (`chunk` C) reads only the token's own chunk, from position (p // C) * C on.
`SplitKVGraphSource` hands out such buckets to the graph runner for models the flashinfer backend
does not serve (chunked attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from epd.engine.attention.base import GraphDecodeBucket, page_arrays
from epd.kernels.fused_ops import gdc_enter, launch_options, tl, triton

BLOCK_T = 16          # tokens per inner step
MAX_SPLITS = 64
MAX_BATCH = 8         # CUDA-graph buckets up to this size capture these kernels


def splits_for(batch: int, kv_heads: int, sm_count: int) -> int:
    """Splits per request so that batch x kv_heads x splits is about two programs per SM."""
    return max(1, min(MAX_SPLITS, -(-2 * sm_count // (batch * kv_heads))))


class SplitKVGraphDecode(GraphDecodeBucket):
    """Decode attention for one CUDA-graph bucket (fixed batch size and device buffers)."""

    def __init__(self, num_kv_heads: int, page_size: int, batch_size: int, indices_buf: torch.Tensor) -> None:
        dev = indices_buf.device
        self.ps, self.batch_size = page_size, batch_size
        self.splits = splits_for(batch_size, num_kv_heads, torch.cuda.get_device_properties(dev).multi_processor_count)
        self._indices = indices_buf
        self._rows = torch.zeros(2 * batch_size + 1, dtype=torch.int32, device=dev)  # [indptr | kv_lens]
        self._rows[batch_size + 1:] = 1

    def plan_padded(self, kv_lens: list[int], page_tables: list[Sequence[int]]) -> None:
        pad = self.batch_size - len(kv_lens)   # padding rows: one token on page 0
        indptr, pages, _ = page_arrays(kv_lens, page_tables, self.ps, pad_rows=pad)
        lens = torch.tensor(list(kv_lens) + [1] * pad, dtype=torch.int32)
        self._rows.copy_(torch.cat([indptr, lens]), non_blocking=True)
        self._indices[:len(pages)].copy_(pages, non_blocking=True)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        return split_kv_decode(q.contiguous(), kv_cache, self._indices, self._rows, self.splits)

    def decode_chunked(self, q: torch.Tensor, kv_cache: torch.Tensor, chunk: int) -> torch.Tensor:
        return split_kv_decode(q.contiguous(), kv_cache, self._indices, self._rows, self.splits, chunk)


class SplitKVGraphSource:
    """The graph runner's source of decode buckets (`device`, `graph_decode`) when the step's own
    backend has none (the torch backend, for chunked-attention models on a GPU)."""

    def __init__(self, num_kv_heads: int, page_size: int, device: torch.device) -> None:
        self.num_kv_heads, self.page_size, self.device = num_kv_heads, page_size, device

    def graph_decode(self, batch_size: int, indices_buf: torch.Tensor) -> SplitKVGraphDecode:
        return SplitKVGraphDecode(self.num_kv_heads, self.page_size, batch_size, indices_buf)


def split_kv_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor,
                    splits: int, chunk: int = 0) -> torch.Tensor:
    """q [B, Hq, D], kv_cache [P, 2, page_size, Hk, D] (any page stride: a layer's view of a shared
    buffer), `chunk` > 0: chunked local attention (a row reads its own chunk only), indices: the
    requests' pages back to back,
    rows: int32 [indptr (B + 1) | kv_lens (B)] -> out [B, Hq, D]."""
    b, hq, d = q.shape
    ps, hk = kv_cache.shape[2], kv_cache.shape[3]
    group = hq // hk
    return merged_slices(q, splits, lambda part, lse: _split_kv_kernel[(b, hk, splits)](
        q, kv_cache, indices, rows, part, lse, 1.0 / math.sqrt(d) * 1.4426950408889634, b, splits,
        kv_cache.stride(0), chunk, HQ=hq, HK=hk, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=d, PS=ps, BLOCK_T=BLOCK_T, num_warps=4, num_stages=2, **launch_options(q, b)))


def merged_slices(q: torch.Tensor, splits: int, attend_slices) -> torch.Tensor:
    """Run `attend_slices(part, lse)` (a kernel writing each split's normalized output [B, Hq,
    splits, D] and log-sum-exp [B, Hq, splits], fp32), then merge the splits -> out like q."""
    b, hq, d = q.shape
    part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    attend_slices(part, lse)
    block_d = min(d, 32)
    _merge_kernel[(b * hq, d // block_d)](part, lse, out, splits, D=d, BLOCK_D=block_d,
                                          SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1,
                                          **launch_options(q, b))
    return out

if triton is not None:

    @triton.jit
    def _split_kv_kernel(q_ptr, cache_ptr, indices_ptr, rows_ptr, part_ptr, lse_ptr, scale_log2, B, SPLITS,
                         page_stride, chunk, HQ: tl.constexpr, HK: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_T: tl.constexpr,
                         USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        req = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_len = tl.load(rows_ptr + B + 1 + req)
        page0 = tl.load(rows_ptr + req)
        kv_start = tl.where(chunk > 0, ((kv_len - 1) // tl.maximum(chunk, 1)) * chunk, 0)   # chunked: own chunk
        per_split = tl.cdiv(tl.cdiv(kv_len - kv_start, SPLITS), BLOCK_T) * BLOCK_T
        t_lo = kv_start + split * per_split
        t_hi = tl.minimum(t_lo + per_split, kv_len)
        q, rows, live, m, mass, acc = start_group(q_ptr, req, kvh, HQ, GROUP, GROUP_PAD, D)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            m, mass, acc = attend_block(q, cache_ptr, indices_ptr + page0, t0 + tl.arange(0, BLOCK_T), t_hi, kvh,
                                        page_stride, scale_log2, m, mass, acc, PS, HK, D)
        store_slice(part_ptr, lse_ptr, rows * SPLITS + split, live, acc, mass, m, D)

    @triton.jit
    def start_group(q_ptr, req, kvh, HQ: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                    D: tl.constexpr):
        """One KV head's GQA group of request `req`: its queries [GROUP_PAD, D] (padding rows zero),
        their rows of q (request x head), which rows are real, and an empty online softmax."""
        g = tl.arange(0, GROUP_PAD)
        rows = req * HQ + kvh * GROUP + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        mass = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
        return q, rows, g < GROUP, m, mass, acc

    @triton.jit
    def attend_block(q, cache_ptr, pages_ptr, t, t_hi, kvh, page_stride, scale_log2, m, mass, acc,
                     ROWS_PER_PAGE: tl.constexpr, HK: tl.constexpr, D: tl.constexpr):
        """One block of rows `t` (those < t_hi) of a paged KV view (rows contiguous within a page,
        any page stride) into a GQA group's online softmax: returns the new (max, mass, acc)."""
        d = tl.arange(0, D)
        tmask = t < t_hi
        page = tl.load(pages_ptr + t // ROWS_PER_PAGE, mask=tmask, other=0).to(tl.int64)
        krow = page * page_stride + ((t % ROWS_PER_PAGE) * HK + kvh) * D         # cache[page, 0, row, kvh]
        k = tl.load(cache_ptr + krow[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(cache_ptr + (krow + ROWS_PER_PAGE * HK * D)[:, None] + d[None, :], mask=tmask[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2                    # [GROUP_PAD, rows], log2 units
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        mass = mass * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, mass, acc

    @triton.jit
    def store_slice(part_ptr, lse_ptr, base, live, acc, mass, m, D: tl.constexpr):
        """A slice's normalized output and log-sum-exp (-inf: it had no rows) for the merge."""
        d = tl.arange(0, D)
        tl.store(part_ptr + base[:, None] * D + d[None, :], acc / tl.maximum(mass, 1e-30)[:, None], mask=live[:, None])
        tl.store(lse_ptr + base, tl.where(mass > 0, m + tl.log2(tl.maximum(mass, 1e-30)), float("-inf")), mask=live)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, SPLITS, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      SPLITS_PAD: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        row = tl.program_id(0)                  # (request, head); axis 1: a slice of head_dim
        s = tl.arange(0, SPLITS_PAD)
        smask = s < SPLITS
        lse = tl.load(lse_ptr + row * SPLITS + s, mask=smask, other=float("-inf"))
        w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
        w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)      # no slice with rows (cross attention): zero
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        part = tl.load(part_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        tl.store(out_ptr + row * D + d, tl.sum(part * w[:, None], axis=0).to(out_ptr.dtype.element_ty))
