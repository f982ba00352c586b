"""The attention-backend contract: plan once per step, then attend once per layer.

A step is a flat batch of tokens from several requests (prefill chunks and decode tokens mixed).
`StepMetadata` describes it; the model runner builds it once per step and calls `plan`, then
each layer calls `attend`, which writes the step's new K/V into the paged cache and attends over
each request's whole context. The torch backend (CPU) and the flashinfer backend (GPU) implement
this same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from epd.kernels.fused_ops import store_kv


@dataclass
class StepMetadata:
    qo_lens: list[int]          # new tokens per request in this step
    kv_lens: list[int]          # context length per request after this step (includes new tokens)
    page_tables: list[Sequence[int]]   # per request: its pages (a list, or `Request.page_array()`)
    page_size: int
    write_slots: torch.Tensor   # [num_tokens] flat slot (page * page_size + offset) of each new token

    @property
    def num_tokens(self) -> int:
        return int(sum(self.qo_lens))


class AttentionBackend(ABC):
    @abstractmethod
    def plan(self, meta: StepMetadata) -> None:
        """Prepare per-step metadata shared by all layers."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               kv_cache: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D], kv_cache: [P, 2, page_size, Hkv, D] -> out [T, Hq, D].
        k and v None: the caller already wrote them to `kv_write_slots()`. A backend that offers
        chunked local attention takes `chunk=C` too (the torch backend does)."""

    def kv_write_slots(self) -> torch.Tensor | None:
        """[T] int64 flat cache slots of this step's new tokens, for a model that writes K/V
        itself (fused with rotary) and then calls `attend` with k = v = None; None when this
        backend wants K/V passed to `attend`."""
        return None


def page_arrays(kv_lens: list[int], page_tables: list[Sequence[int]], page_size: int,
                pad_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host int32 (indptr [B+1], indices [sum pages], last_page_len [B]) for flashinfer.

    `pad_rows` extra rows each see one token on the dummy page 0 (CUDA-graph padding). Tables
    given as int32 arrays (`Request.page_array()`) are joined without a pass over Python ints.
    """
    lens = np.ones(len(kv_lens) + pad_rows, dtype=np.int32)   # padding rows: one token
    lens[:len(kv_lens)] = kv_lens
    counts = (lens + page_size - 1) // page_size
    indptr = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    indices = np.zeros(indptr[-1], dtype=np.int32)           # padding rows keep page 0
    real = int(indptr[len(kv_lens)])
    if real:
        np.concatenate([t[:c] for t, c in zip(page_tables, counts.tolist(), strict=False)], out=indices[:real],
                       casting="same_kind")
    last = lens - (counts - 1) * page_size
    return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


class GraphDecodeBucket(AttentionBackend):
    """Decode attention for one CUDA-graph bucket (fixed batch size, fixed device buffers).

    The graph runner sets `slots` (the static buffer the captured KV writes read) and calls
    `plan_padded` before each replay to refresh the page buffers the captured kernels read."""

    slots: torch.Tensor | None = None

    @abstractmethod
    def plan_padded(self, kv_lens: list[int], page_tables: list[Sequence[int]]) -> None:
        """Page lists of the step's requests; rows past them are padding (one dummy token)."""

    @abstractmethod
    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [bucket, Hq, D] -> out [bucket, Hq, D] over the planned pages."""

    def decode_chunked(self, q: torch.Tensor, kv_cache: torch.Tensor, chunk: int) -> torch.Tensor:
        """`decode` of a chunked local attention layer (each row reads its own chunk of `chunk`)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked attention")

    def plan(self, meta: StepMetadata) -> None:
        self.plan_padded(meta.kv_lens, meta.page_tables)

    def kv_write_slots(self) -> torch.Tensor | None:
        return self.slots

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               kv_cache: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        assert self.slots is not None, "the graph runner sets the static slot buffer"
        if k is not None:
            store_kv(kv_cache, k, v, self.slots)
        return self.decode(q, kv_cache) if chunk is None else self.decode_chunked(q, kv_cache, chunk)
