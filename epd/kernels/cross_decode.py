"""Cross-attention decode for CUDA graphs: each decoded token over the image rows it reads.

A cross-attention layer's KV tensor is `[pages, 2, rows_per_page, Hk, D]`, possibly a view whose
page stride spans other layers' slots (`KVCache`'s shared buffer). A request's image rows lie in
its cross pages back to back; a decoded token reads some `segments` of them, `[start, end)` row
ranges (the valid rows of the images it sees, `epd.engine.attention.cross.token_segments`).

`_cross_decode_kernel`, grid (batch, KV heads, splits): each program takes one KV head of one
request and its split's share of every segment, walks it in 16-row blocks through the page list
and computes the attention of the head's whole GQA group with an online softmax, writing the
share's normalized output and log-sum-exp; `split_kv_decode._merge_kernel` weights the shares. A
row with no segments (a request without images, a padding row) comes out zero, as the eager path
gives for a request without image rows.

`CrossGraphDecode` holds one CUDA-graph bucket's fixed device buffers (segments, pages, the
per-row MLP scale) that `plan` refreshes before each replay; it has `CrossStep`'s interface
(`attend(q, kv_cache)`, `mlp_scale`), so the model's cross-attention layers take either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from epd.kernels.fused_ops import gdc_enter, launch_options, tl, triton
from epd.kernels.split_kv_decode import BLOCK_T, merged_slices, splits_for

if triton is not None:
    from epd.kernels.split_kv_decode import attend_block, start_group, store_slice

MAX_SEGMENTS = 8      # row ranges one decoded token may read (images it sees whose rows are not adjacent)


class CrossGraphDecode:
    """Cross-attention of one CUDA-graph bucket: fixed buffers for `batch_size` rows."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_pages: int, device: torch.device) -> None:
        self.batch_size, self.max_pages = batch_size, max_pages
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        self.splits = splits_for(batch_size, num_kv_heads, props.multi_processor_count if props else 66)
        self._meta = torch.zeros(2 * (batch_size + 1), dtype=torch.int32, device=device)   # [seg indptr | page indptr]
        self._segments = torch.zeros(2 * MAX_SEGMENTS * batch_size, dtype=torch.int32, device=device)
        self._pages = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.mlp_scale = torch.zeros(batch_size, 1, dtype=torch.float32, device=device)

    def fits(self, rows: Sequence[tuple[Sequence[int], Sequence[tuple[int, int]], bool]]) -> bool:
        """Whether a step's rows (`plan`'s: pages, segments, whether it sees an image) fit the buffers."""
        return (len(rows) <= self.batch_size and sum(len(row[0]) for row in rows) <= self.max_pages
                and all(len(row[1]) <= MAX_SEGMENTS for row in rows))

    def plan(self, rows: Sequence[tuple[Sequence[int], Sequence[tuple[int, int]], bool]]) -> None:
        """Per row of the step: (its cross pages, the row segments its token reads, whether it sees
        an image: its MLP runs). Rows past them are padding (no segments)."""
        b = self.batch_size
        meta = torch.zeros(2 * (b + 1), dtype=torch.int32)
        segs, pages, scale = [], [], torch.zeros(b, 1, dtype=torch.float32)
        for i, (row_pages, row_segments, sees) in enumerate(rows):
            segs.extend(x for seg in row_segments for x in seg)
            pages.extend(row_pages)
            meta[i + 1] = len(segs) // 2
            meta[b + 2 + i] = len(pages)
            scale[i] = float(sees)
        meta[len(rows) + 1:b + 1] = len(segs) // 2
        meta[b + 1 + len(rows) + 1:] = len(pages)
        self._meta.copy_(meta, non_blocking=True)
        if segs:
            self._segments[:len(segs)].copy_(torch.tensor(segs, dtype=torch.int32), non_blocking=True)
        if pages:
            self._pages[:len(pages)].copy_(torch.tensor(pages, dtype=torch.int32), non_blocking=True)
        self.mlp_scale.copy_(scale, non_blocking=True)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [bucket, Hq, D] -> [bucket, Hq, D] over each row's planned image rows."""
        return cross_decode(q.contiguous(), kv_cache, self._pages, self._meta, self._segments, self.splits)


def cross_decode(q: torch.Tensor, kv_cache: torch.Tensor, pages: torch.Tensor, meta: torch.Tensor,
                 segments: torch.Tensor, splits: int) -> torch.Tensor:
    """q [B, Hq, D]; kv_cache [P, 2, rows_per_page, Hk, D] (any page stride, rows contiguous within
    a page); pages: the rows' cross pages back to back; meta int32 [segment indptr (B + 1) | page
    indptr (B + 1)]; segments int32 [start, end) pairs back to back -> out [B, Hq, D]."""
    b, hq, d = q.shape
    rpp, hk = kv_cache.shape[2], kv_cache.shape[3]
    assert kv_cache.stride(2) == hk * d and kv_cache.stride(1) == rpp * hk * d, "rows contiguous within a page"
    group = hq // hk
    return merged_slices(q, splits, lambda part, lse: _cross_decode_kernel[(b, hk, splits)](
        q, kv_cache, pages, meta, segments, part, lse, 1.0 / math.sqrt(d) * 1.4426950408889634, b, splits,
        kv_cache.stride(0), HQ=hq, HK=hk, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d,
        RPP=rpp, BLOCK_T=BLOCK_T, num_warps=4, num_stages=2, **launch_options(q, b)))

if triton is not None:

    @triton.jit
    def _cross_decode_kernel(q_ptr, cache_ptr, pages_ptr, meta_ptr, segs_ptr, part_ptr, lse_ptr, scale_log2, B,
                             SPLITS, page_stride, HQ: tl.constexpr, HK: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_PAD: tl.constexpr, D: tl.constexpr, RPP: tl.constexpr, BLOCK_T: tl.constexpr,
                             USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        req = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seg_lo = tl.load(meta_ptr + req)
        seg_hi = tl.load(meta_ptr + req + 1)
        page0 = tl.load(meta_ptr + B + 1 + req)
        q, rows, live, m, mass, acc = start_group(q_ptr, req, kvh, HQ, GROUP, GROUP_PAD, D)
        for s in range(seg_lo, seg_hi):
            r_lo = tl.load(segs_ptr + 2 * s)
            r_hi = tl.load(segs_ptr + 2 * s + 1)
            per_split = tl.cdiv(tl.cdiv(r_hi - r_lo, SPLITS), BLOCK_T) * BLOCK_T
            t_lo = r_lo + split * per_split
            t_hi = tl.minimum(t_lo + per_split, r_hi)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                m, mass, acc = attend_block(q, cache_ptr, pages_ptr + page0, t0 + tl.arange(0, BLOCK_T), t_hi, kvh,
                                            page_stride, scale_log2, m, mass, acc, RPP, HK, D)
        store_slice(part_ptr, lse_ptr, rows * SPLITS + split, live, acc, mass, m, D)
