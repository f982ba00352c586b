"""Image embeddings from the encoder straight into the prefill node's GPU memory, through CUDA IPC.

Over the wire an encoder sends a request's embeddings as one UCX message (20 MB for four 720p
images of the 3b preset). When the router finds the encoder able to write into the prefill node's
GPU (`kv_transfer.cuda_ipc.ipc_writable`), both messages say `emb_ipc`, and:

1. Prefill, when the request arrives: reserves rows of its `EmbeddingArena` (one [tokens, hidden]
   tensor exported through CUDA IPC once) for the request's image tokens and sends the encoder an
   `EmbeddingSlot` (key `{rid}:embslot`: the arena's descriptor and the first row). No room: no
   slot, and the embeddings come over the wire as before.
2. Encoder, once the vision forward is done: the slot in hand, it maps the arena once
   (`ArenaWriter`), copies each image's embeddings into consecutive rows, waits for the copy, and
   sends `Embeddings` with `in_arena` (no tensors). No slot yet, or the write failed (the arena
   then is not tried again): the tensors go over the wire.
3. Prefill takes the rows (a copy of its own, one device-to-device copy) and frees them as soon as
   the encoder's `{rid}:emb` is in, whichever way it came: the encoder writes nothing after it.
   A request dropped before that keeps its rows fenced until the message lands or
   `fence_timeout_s` passes (the encoder might still write into them).
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import torch

from kv_transfer.cuda_ipc import PoolImports, export_pool


class RowAllocator:
    """First fit over the rows [0, capacity): `reserve(n)` -> the first row of n free ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []   # (start, end), sorted
        self._held: dict[int, int] = {}   # start -> end

    def reserve(self, rows: int) -> int | None:
        if rows <= 0:
            raise ValueError(f"cannot reserve {rows} rows")
        for i, (start, end) in enumerate(self._free):
            if end - start >= rows:
                self._free[i:i + 1] = [(start + rows, end)] if end - start > rows else []
                self._held[start] = start + rows
                return start
        return None

    def free(self, start: int) -> None:
        end = self._held.pop(start)
        i = bisect.bisect(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:   # merge with the next free range
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:          # and the previous one
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))

    @property
    def rows_free(self) -> int:
        return sum(end - start for start, end in self._free)


class EmbeddingArena:
    """The prefill node's landing rows for embeddings written by encoders (CUDA only)."""

    def __init__(self, rows: int, hidden: int, dtype: torch.dtype, device: torch.device | str, owner: str,
                 fence_timeout_s: float = 60.0) -> None:
        self.rows = torch.empty(rows, hidden, dtype=dtype, device=device)
        self.desc = export_pool([self.rows], owner=owner) if self.rows.is_cuda else {}   # {}: tests on the CPU
        self.allocator = RowAllocator(rows)
        self.fence_timeout_s = fence_timeout_s
        self.held: dict[str, tuple[int, int]] = {}      # rid -> (first row, rows)
        self.fenced: dict[str, float] = {}              # rid (dropped, the encoder may still write) -> since

    def reserve(self, rid: str, rows: int) -> int | None:
        start = self.allocator.reserve(rows) if rows <= self.allocator.capacity else None
        if start is not None:
            self.held[rid] = (start, rows)
        return start

    def take(self, rid: str, row_counts: list[int]) -> list[torch.Tensor]:
        """The request's embeddings, one tensor per image (copies: the rows are free after this)."""
        start, rows = self.held[rid]
        if sum(row_counts) != rows:
            raise ValueError(f"{sum(row_counts)} embedding rows for a slot of {rows}")
        out, at = [], start
        for n in row_counts:
            out.append(self.rows[at:at + n].clone())
            at += n
        self.release(rid)
        return out

    def release(self, rid: str) -> None:
        """The encoder is done with the request's rows (its message is in): free them."""
        held = self.held.pop(rid, None)
        self.fenced.pop(rid, None)
        if held is not None:
            self.allocator.free(held[0])

    def fence(self, rid: str) -> None:
        """Dropped before the encoder's message: keep the rows until it lands or the fence times out."""
        if rid in self.held:
            self.fenced[rid] = time.monotonic()

    def expire_fences(self) -> list[str]:
        """Free the rows of dropped requests fenced for longer than the timeout; their ids."""
        now = time.monotonic()
        gone = [rid for rid, since in self.fenced.items() if now - since > self.fence_timeout_s]
        for rid in gone:
            self.release(rid)
        return gone


class ArenaWriter:
    """The encoder's side: prefill arenas mapped into this process (once each), written row by row."""

    def __init__(self, device: torch.device | str) -> None:
        self.imports = PoolImports(device)
        self._reported: set[str] = set()   # arenas whose failure was reported

    def first_failure(self, arena: dict[str, Any]) -> bool:
        """True the first time a failed write into `arena` is reported (warn once per arena)."""
        first = arena.get("id") not in self._reported
        self._reported.add(arena.get("id"))
        return first

    @torch.inference_mode()
    def write(self, arena: dict[str, Any], first_row: int, tensors: list[torch.Tensor]) -> None:
        """Copy the tensors into consecutive rows from `first_row` and wait for the copy; raises when
        the arena was found unusable before or cannot be mapped or written (then it is not tried again)."""
        try:
            rows = self.imports.mapped(arena)
            total = sum(t.shape[0] for t in tensors)
            if first_row < 0 or first_row + total > rows.shape[0]:
                raise ValueError(f"rows {first_row}..{first_row + total} are outside the arena of {rows.shape[0]}")
            at = first_row
            for t in tensors:
                if t.dim() != 2 or t.shape[1] != rows.shape[1] or t.dtype != rows.dtype:
                    raise ValueError(f"embeddings {tuple(t.shape)} {t.dtype} do not fit rows "
                                     f"{tuple(rows.shape[1:])} {rows.dtype}")
                rows[at:at + t.shape[0]].copy_(t)
                at += t.shape[0]
            torch.cuda.current_stream(rows.device).synchronize()
        except Exception as e:
            self.imports.mark_unusable(arena, str(e) or type(e).__name__)
            raise

    def drop_orphans(self, live_owners: set[str]) -> list[str]:
        return self.imports.drop_orphans(live_owners)
