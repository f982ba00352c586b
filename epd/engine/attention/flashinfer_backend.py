"""Paged attention on GPU through flashinfer (bf16/fp16 KV in the pool's NHD layout).

Lifecycle: `FlashInferBackend(...)` allocates one shared float workspace and two eager wrappers.
Per step, `plan(meta)` builds the page arrays once (indptr, page indices, last-page lengths) and
plans either the decode wrapper (every request has one new token) or the prefill wrapper (any
prefill chunk: ragged queries, causal within the chunk, seeing every earlier page of the
request, so chunked prefill and mixed prefill+decode steps are one call per layer). Per layer, the
model writes the new K/V into the cache fused with rotary (`kv_write_slots`; else `attend` writes
them with one kernel) and `attend` runs the planned wrapper.

CUDA graphs: `graph_decode(bs, indices_buf)` gives the decode attention of one batch-size bucket,
with fixed-size page buffers that the captured kernels read and `plan_padded` refreshes before
each replay: for small buckets the split-KV Triton kernels (`split_kv_decode`: faster than
flashinfer's decode at batch 1-8, where latency dominates), else `GraphDecodeAttention`,
flashinfer's wrapper with `use_cuda_graph=True`.

Decode uses the tensor-core kernel (the prefill kernel with one query row per request): it suits
GQA groups of 7-8 (Qwen2.5-VL 7B/3B) and shares the JIT-compiled module with prefill, so a fresh
machine compiles one module, not two. flashinfer has no float32 kernels: `supports()` says so,
and the engine then uses the torch backend.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import numpy as np
import torch

from epd.engine.attention.base import AttentionBackend, GraphDecodeBucket, StepMetadata, page_arrays
from epd.kernels import split_kv_decode
from epd.kernels.fused_ops import store_kv, triton
from epd.kernels.split_kv_decode import SplitKVGraphDecode

try:
    import flashinfer
except ImportError:  # pragma: no cover - CPU-only hosts
    flashinfer = None

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 256 << 20
# plan(..., non_blocking=True) where this flashinfer's decode wrapper takes it
_NON_BLOCKING = ({"non_blocking": True} if flashinfer is not None and "non_blocking" in inspect.signature(
    flashinfer.BatchDecodeWithPagedKVCacheWrapper.plan).parameters else {})
GRAPH_DECODE = "split_kv"     # or "flashinfer": which decode attention CUDA graphs capture
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when flashinfer can serve this model here, else the reason it cannot."""
    if flashinfer is None:
        return "flashinfer is not installed"
    if device.type != "cuda":
        return f"flashinfer needs a CUDA device, not {device.type}"
    if dtype not in SUPPORTED_DTYPES:
        return f"flashinfer has no {dtype} attention kernels (bf16/fp16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of flashinfer's {SUPPORTED_HEAD_DIMS}"
    return None


class _Shape:
    """Head counts, dims and dtype: what every plan call repeats."""

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype) -> None:
        self.hq, self.hk, self.d, self.ps, self.dtype = num_qo_heads, num_kv_heads, head_dim, page_size, dtype

    def plan_args(self) -> tuple[int, int, int, int]:
        return self.hq, self.hk, self.d, self.ps


class PlanFence:
    """Keeps a flashinfer wrapper's `plan` from refilling its page-locked host buffer before the
    copy of the previous plan has left it. `plan` writes the step's schedule there and queues an
    asynchronous copy to the device without waiting; under the overlap schedule the next plan runs
    while the step before is still on the GPU, possibly before that copy has run (it is queued
    behind the step before that one). Each plan records an event after itself; the next one waits
    for it first, which in practice is already complete. (The CUDA-graph buckets' plans need no
    fence of their own: `CudaGraphDecodeRunner.prepare` waits for the previous step's copies.)"""

    def __init__(self, device: torch.device) -> None:
        self._done = torch.cuda.Event() if device.type == "cuda" else None
        self._pending = False

    def __enter__(self) -> PlanFence:
        if self._pending:
            self._done.synchronize()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._done is not None:
            self._done.record()
            self._pending = True


class FlashInferBackend(AttentionBackend):
    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        reason = supports(device, dtype, head_dim)
        if reason is not None:
            raise RuntimeError(f"flashinfer backend unavailable: {reason}")
        self.shape = _Shape(num_qo_heads, num_kv_heads, head_dim, page_size, dtype)
        self.device = device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self._active = self._decode
        self._fences = {self._decode: PlanFence(device), self._prefill: PlanFence(device)}
        self._slots: torch.Tensor | None = None

    def plan(self, meta: StepMetadata) -> None:
        s = self.shape
        indptr, indices, last = page_arrays(meta.kv_lens, meta.page_tables, s.ps)
        decode = all(n == 1 for n in meta.qo_lens)
        self._active = self._decode if decode else self._prefill
        with self._fences[self._active]:
            if decode:
                self._decode.plan(indptr, indices, last, *s.plan_args(), q_data_type=s.dtype, kv_data_type=s.dtype)
            else:
                qo = np.zeros(len(meta.qo_lens) + 1, dtype=np.int32)
                np.cumsum(meta.qo_lens, out=qo[1:])
                self._prefill.plan(torch.from_numpy(qo), indptr, indices, last, *s.plan_args(), causal=True,
                                   q_data_type=s.dtype, kv_data_type=s.dtype)
        self._slots = meta.write_slots

    def kv_write_slots(self) -> torch.Tensor | None:
        return self._slots

    def attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
               kv_cache: torch.Tensor) -> torch.Tensor:
        assert self._slots is not None, "plan() must run before attend()"
        if k is not None:
            store_kv(kv_cache, k, v, self._slots)
        return self._active.run(q.contiguous(), kv_cache)

    def graph_decode(self, batch_size: int, indices_buf: torch.Tensor) -> GraphDecodeBucket:
        """The decode attention captured in one CUDA-graph bucket: up to `split_kv_decode.MAX_BATCH`
        rows the split-KV Triton kernels (`GRAPH_DECODE = "split_kv"`, the default), else
        flashinfer's graph wrapper."""
        if GRAPH_DECODE == "split_kv" and triton is not None and batch_size <= split_kv_decode.MAX_BATCH:
            s = self.shape
            return SplitKVGraphDecode(s.hk, s.ps, batch_size, indices_buf)
        return GraphDecodeAttention(self, batch_size, indices_buf)


class GraphDecodeAttention(GraphDecodeBucket):
    """flashinfer's decode wrapper for one CUDA-graph bucket (`use_cuda_graph=True`: fixed-size
    indptr / indices / last-page buffers that `plan_padded` refreshes)."""

    def __init__(self, parent: FlashInferBackend, batch_size: int, indices_buf: torch.Tensor) -> None:
        dev = parent.device
        self.shape = parent.shape
        self.batch_size = batch_size
        self._indices = indices_buf
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            parent.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=indices_buf,
            paged_kv_last_page_len_buffer=torch.ones(batch_size, dtype=torch.int32, device=dev))

    def plan_padded(self, kv_lens: list[int], page_tables: list[Sequence[int]]) -> None:
        """Refresh the bucket's page buffers without waiting for the device: a blocking copy would
        wait for the step still running and undo the overlap schedule. flashinfer (0.6.12) copies
        indptr and last-page lengths without blocking, but the page indices only when they are
        already on the device (a host array is copied blocking), so they go to the bucket's
        indices buffer here first, without blocking (a pageable source is staged at once), and
        flashinfer's own copy of that buffer onto itself is a no-op (torch's copy_ returns at once
        for two equal views of the same memory). The copies queue behind the running step, before
        this bucket's replay."""
        s = self.shape
        pad = self.batch_size - len(kv_lens)
        indptr, indices, last = page_arrays(kv_lens, page_tables, s.ps, pad_rows=pad)
        on_device = self._indices[:len(indices)]
        on_device.copy_(indices, non_blocking=True)
        # its page-locked buffer is free: the graph runner waits for the previous step's copies first
        self._wrapper.plan(indptr, on_device, last, *s.plan_args(), q_data_type=s.dtype, kv_data_type=s.dtype,
                           **_NON_BLOCKING)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        return self._wrapper.run(q, kv_cache)
