"""The paged KV cache: a page allocator and the per-layer KV tensors it indexes.

Lifecycle of a page: free -> `allocate` (owned by one request) -> `free` -> free again. With
prefix caching a full page whose tokens are known can be `register`ed under the hash of its
prefix (`epd.engine.prefix_cache`); later requests with that prefix `acquire` it too (a page may then
have several owners: `free` drops one), and once nobody owns it it waits on an LRU list, still
holding its KV, until a request hits it again or `allocate` needs it back (evicted, oldest first).
Freeing a page that is not allocated raises, so a double free is a loud bug, not a silent leak.
`check_integrity()` asserts free + cached + in-use == total; tests call it after every case.

Layout per layer: `[num_pages, 2, page_size, kv_heads, head_dim]` (flashinfer "NHD"). Page 0 is
reserved as a dummy page (padding slots of CUDA-graph batches write there), never handed out.

A model with cross-attention layers (their KV is image rows, not tokens) has one buffer
`[num_pages, self-attention layers, 2, page_size, kv_heads, head_dim]` instead: a page is either a
token page, read through the self-attention layers' views (`buffer[:, i]`, a page stride over all
of them), or an image-row page, read through the cross-attention layers' views, each of which
spans `k = self layers // cross layers` of those slots and so holds `k * page_size` rows
(`cross_page_rows`). Both kinds come from the one allocator, and a page costs its bytes once,
whichever kind it is (one tensor a layer would cost an image row every layer's bytes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

DUMMY_PAGE = 0


class OutOfPagesError(RuntimeError):
    pass


class PagePool:
    """Hands out page ids; knows nothing about tensors."""

    def __init__(self, num_pages: int, page_size: int, cross_page_rows: int = 0) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (one is a reserved dummy), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.cross_page_rows = cross_page_rows or page_size   # image rows a page holds (cross-attention)
        self._free: list[int] = list(range(num_pages - 1, DUMMY_PAGE, -1))  # pop() gives low ids first
        self._owners: dict[int, int] = {}                  # page in use -> how many requests hold it
        self._cached: OrderedDict[int, None] = OrderedDict()   # registered pages nobody holds, LRU first
        self._page_of: dict[bytes, int] = {}               # prefix hash -> page holding that prefix's KV
        self._hash_of: dict[int, bytes] = {}
        self.evictions = 0

    @property
    def capacity(self) -> int:
        """Pages a request can ever get (all but the dummy)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def num_in_use(self) -> int:
        return len(self._owners)

    @property
    def num_cached(self) -> int:
        """Pages nobody holds that keep a registered prefix's KV."""
        return len(self._cached)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def pages_for_rows(self, rows: int) -> int:
        """Pages `rows` image rows take (cross-attention layers)."""
        return -(-rows // self.cross_page_rows)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPagesError(f"asked for {n} KV pages, {self.num_free} free")
        pages = [self._free.pop() if self._free else self._evict() for _ in range(n)]
        self._owners.update(dict.fromkeys(pages, 1))
        return pages

    def _evict(self) -> int:
        page, _ = self._cached.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
        self.evictions += 1
        return page

    def free(self, pages: list[int]) -> None:
        for p in pages:
            owners = self._owners.get(p)
            if owners is None:
                raise RuntimeError(f"KV page {p} freed but not in use (double free?)")
            if owners > 1:
                self._owners[p] = owners - 1
                continue
            del self._owners[p]
            if p in self._hash_of:
                self._cached[p] = None     # keeps its KV until hit again or evicted
            else:
                self._free.append(p)

    # ---- prefix caching -------------------------------------------------------------------------
    def match(self, hashes: list[bytes]) -> list[int]:
        """Pages holding the longest run of `hashes` from the first (no owner taken)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def cost(self, pages: list[int]) -> int:
        """How many free pages acquiring `pages` uses up (those nobody holds now)."""
        return sum(1 for p in pages if p in self._cached)

    def acquire(self, pages: list[int]) -> None:
        """Take one more owner of each page (cached pages nobody held become in use again)."""
        for p in pages:
            if p in self._cached:
                del self._cached[p]
                self._owners[p] = 1
            else:
                self._owners[p] += 1

    def register(self, pages: list[int], hashes: list[bytes]) -> None:
        """Record that pages[i] holds the KV of the prefix hashes[i] ends (in use, full pages); a
        prefix already held by another page keeps that one."""
        for page, h in zip(pages, hashes, strict=False):
            if h not in self._page_of and page not in self._hash_of and page in self._owners:
                self._page_of[h] = page
                self._hash_of[page] = h

    def check_integrity(self) -> None:
        free, cached, used = set(self._free), set(self._cached), set(self._owners)
        if len(free) != len(self._free):
            raise AssertionError("KV page pool: duplicate ids on the free list")
        if free & used:
            raise AssertionError(f"KV page pool: pages both free and in use: {sorted(free & used)[:8]}")
        if cached & (free | used):
            raise AssertionError(f"KV page pool: cached pages also free or in use: {sorted(cached & (free | used))}")
        if len(free) + len(cached) + len(used) != self.capacity:
            raise AssertionError(f"KV page pool: free {len(free)} + cached {len(cached)} + in use {len(used)} "
                                 f"!= total {self.capacity}")
        if set(self._hash_of) - cached - used or len(self._page_of) != len(self._hash_of):
            raise AssertionError("KV page pool: a free page is still registered, or the hash maps disagree")
        if any(n < 1 for n in self._owners.values()):
            raise AssertionError("KV page pool: a page in use without an owner")

    def owner_counts(self) -> dict[int, int]:
        """Page in use -> how many requests hold it."""
        return dict(self._owners)


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    cross_layers: tuple[int, ...] = ()   # layers whose KV is image rows (cross-attention)

    @property
    def slots_per_cross_layer(self) -> int:
        """Self-attention layer slots of a page one cross-attention layer spans (0: no shared buffer)."""
        cross = len(self.cross_layers)
        return (self.num_layers - cross) // cross if cross else 0

    def bytes_per_page(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        layers = self.num_layers - len(self.cross_layers) if self.slots_per_cross_layer else self.num_layers
        return layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * elem


class KVCache:
    """Per-layer KV tensors plus the page allocator over them."""

    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device | str) -> None:
        self.spec = spec
        k = spec.slots_per_cross_layer
        self.pool = PagePool(num_pages, spec.page_size, cross_page_rows=k * spec.page_size)
        shape = (num_pages, 2, spec.page_size, spec.num_kv_heads, spec.head_dim)
        # Uninitialised: attention only reads slots that were written. The dummy page is zeroed
        # because padded CUDA-graph rows write and read it.
        self.buffer: torch.Tensor | None = None   # the one tensor behind every layer's view (shared buffer)
        if k:
            self.layers, self.buffer = self._shared_views(spec, num_pages, device)
        else:
            self.layers = [torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        for layer in self.layers:
            layer[DUMMY_PAGE].zero_()

    @staticmethod
    def _shared_views(spec: KVCacheSpec, num_pages: int,
                      device: torch.device | str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Views of one buffer (returned too): a self-attention layer's `[pages, 2, page_size, ...]`,
        a cross-attention layer's `[pages, 2, k * page_size, ...]` over k consecutive self-attention slots."""
        k, cross = spec.slots_per_cross_layer, set(spec.cross_layers)
        slots = spec.num_layers - len(cross)
        buffer = torch.empty(num_pages, slots, 2, spec.page_size, spec.num_kv_heads, spec.head_dim,
                             dtype=spec.dtype, device=device)
        layers, next_slot, next_cross = [], 0, 0
        for i in range(spec.num_layers):
            if i in cross:
                block = buffer[:, k * next_cross:k * (next_cross + 1)].flatten(1, 3)
                layers.append(block.unflatten(1, (2, k * spec.page_size)))
                next_cross += 1
            else:
                layers.append(buffer[:, next_slot])
                next_slot += 1
        return layers, buffer

    @staticmethod
    def pages_fitting(spec: KVCacheSpec, budget_bytes: int) -> int:
        return max(2, budget_bytes // spec.bytes_per_page())

    def slots(self, page_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of token positions [start, end) of a request."""
        ps = self.spec.page_size
        pos = torch.arange(start, end)
        pages = torch.tensor(page_ids, dtype=torch.long)[pos // ps]
        return pages * ps + pos % ps
