"""Gather one request's KV from a paged pool into the compact wire layout, and scatter it back.

Pure torch, no I/O. Lifecycle of one request's KV across a transfer:

1. The sender splits its layers with `layer_groups` and, as each group finishes prefill,
   calls `gather_kv` on that group's layer caches: the request's tokens are copied out of
   its pages into one contiguous wire tensor per group.
2. The wire tensor travels as one message (see `transport`); the receiver allocates its own
   tensor with `empty_wire` (or receives into a staging buffer of that shape).
3. The receiver calls `scatter_kv` into the pages it allocated for the request. Sender and
   receiver page sizes are independent: only the token order is shared.

Shapes:
- pool, one tensor per layer: ``[num_pages, 2, page_size, kv_heads, head_dim]`` (2 = K, V)
- wire, one tensor per layer group: ``[layers_in_group, 2, num_tokens, kv_heads, head_dim]``

Both directions are one `index_select` / `index_copy_` per layer over a flattened
``[num_pages * 2 * page_size, kv_heads, head_dim]`` view; no Python loop per token or page. A layer
that is a strided view of a larger buffer (pages a stride apart: a model with cross-attention
layers) is indexed by (page, row) pairs instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_groups(num_layers: int, group_size: int) -> list[range]:
    """Consecutive layer ranges of at most `group_size` layers covering `num_layers`."""
    if num_layers <= 0 or group_size <= 0:
        raise ValueError(f"num_layers and group_size must be positive ({num_layers}, {group_size})")
    return [range(s, min(s + group_size, num_layers)) for s in range(0, num_layers, group_size)]


def kind_groups(chunks: Sequence[int | None], group_size: int) -> list[list[int]]:
    """Layer groups for a model whose layers keep different token ranges (`chunks[i]`: layer i's
    attention chunk, None for full attention): each group holds layers of one kind only, at most
    `group_size`, in the order the layers complete; with one kind, the layers of `layer_groups`."""
    by_kind: dict[int | None, list[int]] = {}
    for i, chunk in enumerate(chunks):
        by_kind.setdefault(chunk, []).append(i)
    groups = [layers[s:s + group_size] for layers in by_kind.values() for s in range(0, len(layers), group_size)]
    return sorted(groups, key=lambda g: g[-1])


def tokens_needed(prompt_len: int, chunk: int | None) -> int:
    """The first prompt token a layer's decode still reads: 0 for full attention, the start of the
    chunk the first generated token falls in for chunked attention."""
    return prompt_len // chunk * chunk if chunk else 0


def wire_shape(num_layers: int, num_tokens: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer group on the wire."""
    return (num_layers, 2, num_tokens, kv_heads, head_dim)


def empty_wire(
    num_layers: int,
    num_tokens: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uninitialised contiguous wire tensor, e.g. a receive buffer for `transport.expect`."""
    return torch.empty(wire_shape(num_layers, num_tokens, kv_heads, head_dim), dtype=dtype, device=device)


def _check_pool(layer_caches: Sequence[torch.Tensor]) -> tuple[int, int, int, torch.dtype, torch.device]:
    """Validate the layer caches and return (page_size, kv_heads, head_dim, dtype, device)."""
    if not layer_caches:
        raise ValueError("no layer caches given")
    first = layer_caches[0]
    if first.dim() != 5 or first.shape[1] != 2:
        raise ValueError(f"layer cache must be [num_pages, 2, page_size, kv_heads, head_dim], got {tuple(first.shape)}")
    for cache in layer_caches:
        if cache.shape[1:] != first.shape[1:] or cache.dtype != first.dtype or cache.device != first.device:
            raise ValueError("all layer caches of a group must share shape[1:], dtype and device")
        if not cache[0].is_contiguous():
            raise ValueError("each page of a layer cache must be contiguous")
    _, _, page_size, kv_heads, head_dim = first.shape
    return page_size, kv_heads, head_dim, first.dtype, first.device


def token_slots(
    page_ids: torch.Tensor | Sequence[int], num_tokens: int, page_size: int, device: torch.device, first: int = 0
) -> torch.Tensor:
    """Row indices of K then V of each token in a ``[pages * 2 * page_size, ...]`` view.

    Returns int64 ``[2 * num_tokens]``: first the K rows of tokens first..first+n-1, then their V rows.
    """
    pages = torch.as_tensor(page_ids, dtype=torch.int64, device=device).flatten()
    needed = -(-(first + num_tokens) // page_size)
    if pages.numel() < needed:
        raise ValueError(f"{first + num_tokens} tokens need {needed} pages of {page_size}, page table has "
                         f"{pages.numel()}")
    tok = torch.arange(first, first + num_tokens, dtype=torch.int64, device=device)
    # row of (page, kv, slot) in the flattened pool: (page * 2 + kv) * page_size + slot
    base = pages[tok // page_size] * (2 * page_size) + tok % page_size
    return torch.cat([base, base + page_size])


def gather_kv(
    layer_caches: Sequence[torch.Tensor],
    page_ids: torch.Tensor | Sequence[int],
    num_tokens: int,
    out: torch.Tensor | None = None,
    first: int = 0,
) -> torch.Tensor:
    """Copy one request's KV out of a group of layer caches into wire layout.

    layer_caches: the group's layers, each ``[num_pages, 2, page_size, kv_heads, head_dim]``
    page_ids: the request's page table (token i lives in page ``page_ids[i // page_size]``)
    out: optional destination ``[len(layer_caches), 2, num_tokens, kv_heads, head_dim]``
    first: the first token copied (tokens first..first+num_tokens-1)
    Returns the (contiguous) wire tensor.
    """
    page_size, kv_heads, head_dim, dtype, device = _check_pool(layer_caches)
    shape = wire_shape(len(layer_caches), num_tokens, kv_heads, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")
    rows = token_slots(page_ids, num_tokens, page_size, device, first)
    for layer, cache in enumerate(layer_caches):
        dst = out[layer].view(2 * num_tokens, kv_heads, head_dim)
        if cache.is_contiguous():
            flat = cache.view(-1, kv_heads, head_dim)  # [num_pages * 2 * page_size, kv_heads, head_dim]
            torch.index_select(flat, 0, rows, out=dst)
        else:
            dst.copy_(cache.flatten(1, 2)[rows // (2 * page_size), rows % (2 * page_size)])
    return out


def scatter_kv(
    wire: torch.Tensor,
    layer_caches: Sequence[torch.Tensor],
    page_ids: torch.Tensor | Sequence[int],
    first: int = 0,
) -> None:
    """Write a wire tensor ``[layers, 2, num_tokens, kv_heads, head_dim]`` into pages in place (as
    tokens first..first+num_tokens-1)."""
    page_size, kv_heads, head_dim, dtype, device = _check_pool(layer_caches)
    if wire.dim() != 5 or wire.shape[0] != len(layer_caches) or wire.shape[1] != 2:
        raise ValueError(f"wire shape {tuple(wire.shape)} does not match {len(layer_caches)} layer caches")
    if tuple(wire.shape[3:]) != (kv_heads, head_dim) or wire.dtype != dtype:
        raise ValueError(f"wire {tuple(wire.shape[3:])} {wire.dtype} != pool {(kv_heads, head_dim)} {dtype}")
    num_tokens = wire.shape[2]
    rows = token_slots(page_ids, num_tokens, page_size, device, first)
    wire = wire.to(device)
    for layer, cache in enumerate(layer_caches):
        src = wire[layer].reshape(2 * num_tokens, kv_heads, head_dim)
        if cache.is_contiguous():
            cache.view(-1, kv_heads, head_dim).index_copy_(0, rows, src)
        else:
            cache.flatten(1, 2)[rows // (2 * page_size), rows % (2 * page_size)] = src
