"""The paged KV cache: a page allocator and the per-layer KV tensors it indexes.

Lifecycle of a page: free -> `allocate` (owned by one request) -> `free` -> free again.
Freeing a page that is not allocated raises, so a double free is a loud bug, not a silent leak.
`check_integrity()` asserts free + in-use == total; tests call it after every case.

Layout per layer: `[num_pages, 2, page_size, kv_heads, head_dim]` (flashinfer "NHD"). Page 0 is
reserved as a dummy page (padding slots of CUDA-graph batches write there), never handed out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUMMY_PAGE = 0


class OutOfPagesError(RuntimeError):
    pass


class PagePool:
    """Hands out page ids; knows nothing about tensors."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (one is a reserved dummy), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(num_pages - 1, DUMMY_PAGE, -1))  # pop() gives low ids first
        self._in_use: set[int] = set()

    @property
    def capacity(self) -> int:
        """Pages a request can ever get (all but the dummy)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} KV pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._in_use.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._in_use:
                raise RuntimeError(f"KV page {p} freed but not in use (double free?)")
            self._in_use.remove(p)
            self._free.append(p)

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("KV page pool: duplicate ids on the free list")
        if free & self._in_use:
            raise AssertionError(f"KV page pool: pages both free and in use: {sorted(free & self._in_use)[:8]}")
        if len(free) + len(self._in_use) != self.capacity:
            raise AssertionError(f"KV page pool: free {len(free)} + in use {len(self._in_use)} "
                                 f"!= total {self.capacity}")


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    def bytes_per_page(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * elem


class KVCache:
    """Per-layer KV tensors plus the page allocator over them."""

    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str) -> None:
        self.spec = spec
        self.pool = PagePool(num_pages, spec.page_size)
        shape = (num_pages, 2, spec.page_size, spec.num_kv_heads, spec.head_dim)
        # Uninitialised: attention only reads slots that were written. The dummy page is zeroed
        # because padded CUDA-graph rows write and read it.
        self.layers = [torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        for layer in self.layers:
            layer[DUMMY_PAGE].zero_()

    @staticmethod
    def pages_fitting(spec: KVCacheSpec, budget_bytes: int) -> int:
        return max(2, budget_bytes // spec.bytes_per_page())

    def slots(self, page_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of token positions [start, end) of a request."""
        ps = self.spec.page_size
        pos = torch.arange(start, end)
        pages = torch.tensor(page_ids, dtype=torch.long)[pos // ps]
        return pages * ps + pos % ps
