"""Cross-attention over a request's image rows, for families whose images enter that way.

A request with images holds, besides its token pages, `cross_pages`: pages whose slots hold its
image rows' keys and values in each cross-attention layer's KV tensor (image after image, rows
0..R-1 in page order). They are written once per admission (`write_rows`, from the family's
`cross_kv`), and read by every step of the request. Which rows a token reads follows the
request's `cross_spans` (prompt tokens [first, end) that see each image; generated tokens see
the images whose span runs to the end) and `cross_rows` (a seen image's leading rows); a token
that sees no image reads every row and its MLP is skipped (`mlp_scale` 0), and a request without
images skips the layer (its rows of the output are zero, `mlp_scale` 0).

`CrossStep.plan(chunks)` builds this once per step; `attend(q, kv_cache)` runs per layer. This is
the torch path (CPU, prefill and eager steps on the GPU): one SDPA per request with a boolean row
mask. CUDA-graph decode takes `epd.kernels.cross_decode.CrossGraphDecode` instead, which reads a
token's rows as ranges (`token_segments`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epd.kernels.fused_ops import store_kv


@dataclass
class CrossChunk:
    q_len: int
    pages: Sequence[int] = ()             # the request's cross pages (empty: it has no image rows)
    visible: torch.Tensor | None = None   # [q_len, rows] bool: the rows each token reads
    sees: torch.Tensor | None = None      # [q_len] bool: the token sees an image (runs the MLP)


def visibility(cross_rows: list[tuple[int, int]], spans: list[tuple[int, int]], prompt_len: int,
               start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows each token of [start, end) reads [end - start, R] bool, whether it sees an image [n])."""
    n = end - start
    index = torch.arange(start, end)
    total = sum(rows for rows, _ in cross_rows)
    visible = torch.zeros(n, total, dtype=torch.bool)
    offset = 0
    for (rows, valid), (first, last) in zip(cross_rows, spans, strict=True):
        prompt_sees = (index >= first) & (index < (prompt_len if last == -1 else last)) & (index < prompt_len)
        sees = prompt_sees | ((index >= prompt_len) & (last == -1))
        visible[:, offset:offset + valid] |= sees[:, None]
        offset += rows
    sees_any = visible.any(dim=1)
    visible[~sees_any] = True
    return visible, sees_any


def token_segments(cross_rows: list[tuple[int, int]], spans: list[tuple[int, int]], prompt_len: int,
                   index: int) -> tuple[list[tuple[int, int]], bool]:
    """The rows token `index` reads as [start, end) ranges (adjacent ones joined), and whether it
    sees an image: `visibility`'s row for one token, for kernels that take ranges."""
    segments: list[tuple[int, int]] = []
    offset = 0
    for (rows, valid), (first, last) in zip(cross_rows, spans, strict=True):
        in_prompt = first <= index < min(prompt_len if last == -1 else last, prompt_len)
        if in_prompt or (index >= prompt_len and last == -1):
            if segments and segments[-1][1] == offset:
                segments[-1] = (segments[-1][0], offset + valid)
            else:
                segments.append((offset, offset + valid))
        offset += rows
    if not segments:   # a token that sees no image reads every row (its MLP is skipped)
        return [(0, offset)] if offset else [], False
    return segments, True


def row_slots(pages: Sequence[int], rows: int, page_size: int) -> torch.Tensor:
    """Flat slots (page * page_size + offset) of rows 0..rows-1 laid over `pages`."""
    r = torch.arange(rows)
    return torch.as_tensor(list(pages), dtype=torch.long)[r // page_size] * page_size + r % page_size


def write_rows(kv_cache: torch.Tensor, pages: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """k, v [R, Hkv, D] into rows 0..R-1 of `pages` of one layer's cache [P, 2, page_size, Hkv, D]."""
    store_kv(kv_cache, k, v, row_slots(pages, k.shape[0], kv_cache.shape[2]).to(kv_cache.device))


class CrossStep:
    """One step's cross-attention plan (torch)."""

    def __init__(self, chunks: list[CrossChunk], rows_per_page: int, device: torch.device) -> None:
        self.chunks = chunks
        self.device = device
        self._slots = [row_slots(c.pages, c.visible.shape[1], rows_per_page).to(device) if c.visible is not None
                       else None for c in chunks]
        scale = [c.sees if c.sees is not None else torch.zeros(c.q_len, dtype=torch.bool) for c in chunks]
        self.mlp_scale = torch.cat(scale).to(device=device, dtype=torch.float32)[:, None]

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D]: each token over the image rows it reads (zeros: no rows)."""
        ps = kv_cache.shape[2]
        out = torch.zeros_like(q)
        start = 0
        for c, slots in zip(self.chunks, self._slots, strict=True):
            if slots is not None:
                keys = kv_cache[slots // ps, 0, slots % ps].to(q.dtype).transpose(0, 1).unsqueeze(0)
                vals = kv_cache[slots // ps, 1, slots % ps].to(q.dtype).transpose(0, 1).unsqueeze(0)
                qs = q[start:start + c.q_len].transpose(0, 1).unsqueeze(0)        # [1, Hq, q_len, D]
                mask = c.visible.to(q.device)[None, None]
                o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, enable_gqa=True)
                out[start:start + c.q_len] = o.squeeze(0).transpose(0, 1)
            start += c.q_len
        return out
